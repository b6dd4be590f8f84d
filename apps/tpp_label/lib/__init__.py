"""The tpp_label app's tasks, laid out as MONAI Label's sample apps (``lib/infers``, ``lib/trainers``)."""
