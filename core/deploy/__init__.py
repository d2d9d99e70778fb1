"""A trained student in use: finding its run, predicting new cases, exporting it."""
