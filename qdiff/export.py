"""Deprecated spelling of the artifact command: ``python -m qdiff.deploy`` is ``python -m qdiff.deploy`` (same
arguments). ``qdiff.export`` itself is the export function (:func:`qdiff.deploy.export`); importing this module
keeps it so."""
import sys
import warnings

if __name__ == "__main__":
    warnings.warn("`python -m qdiff.deploy` is deprecated and will be removed in the next release; use "
                  "`python -m qdiff.deploy` (same arguments)", DeprecationWarning, stacklevel=1)
    print("warning: `python -m qdiff.deploy` is deprecated; use `python -m qdiff.deploy` (same arguments)", file=sys.stderr)
    from qdiff.deploy.cli import main

    sys.exit(main())
else:  # `import qdiff.export` binds qdiff.export to this module: make that the function, the one public qdiff.export
    from qdiff.deploy import export

    sys.modules[__name__] = export
