"""Annotation-server support for the MONAI Label app in ``apps/tpp_label``, which serves and trains the bundles.

``images``: upload / datastore checks of 2D images and labels; ``nnunet3d``: the 3D nnU-Net task; ``progress``:
train_stats across the TPP and fine-tuning stages; ``safety``: request checks; ``serve``: the loopback launcher.
The model, its preprocessing and its training are the bundle's (``inference.json``, ``tpp_pretrain.json``,
``train.json``), run by MONAI Label's ``BundleInferTask`` / ``BundleTrainTask``.
"""
