# `python -m node`: the same entry point as the ramster-node console script.
import sys

from node.main import main

sys.exit(main())
