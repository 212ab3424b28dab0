"""``python -m edgeslim ...``: the same command line as the ``edgeslim`` script, for an
environment whose scripts folder is not on ``PATH``."""

from edgeslim.cli import main

if __name__ == "__main__":
    main()
