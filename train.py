from normlab.run.forkserver import main  # a sweep's worker server first, then normlab.train.main

if __name__ == "__main__":  # guard: DDP spawns processes that re-import this file
    main()
