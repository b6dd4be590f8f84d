"""Data: datalist preparation for the public datasets, MONAI transform chains, real demo data."""
