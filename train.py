import sys

if __name__ == "__main__":  # guard: DDP spawns processes that re-import this file
    from normlab.run.forkserver import start_early

    start_early(sys.argv[1:])  # first: a sweep's workers import torch and Lightning meanwhile
    from normlab.train import main

    main()
