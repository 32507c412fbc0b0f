"""Coverage-guided fuzz targets (atheris): ``make fuzz`` runs them, ``make test`` replays their corpora."""
