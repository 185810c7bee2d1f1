"""``python -m qdiff.deploy <run_dir or artifact> [--out DIR] [--check int8]``: see :mod:`qdiff.deploy.cli`."""
import sys

from qdiff.deploy.cli import main

sys.exit(main())
