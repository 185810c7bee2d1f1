"""The stages of a run that are more than one call into a package: ``sample`` makes every sample set the run needs,
``evaluate`` only scores them (and draws the figures from them). The run itself: :mod:`qdiff.run`."""
