from normlab.train import main

if __name__ == "__main__":  # guard: DDP spawns processes that re-import this file
    main()
