"""Deploying a trained model: export to Paddle Inference (export.py), the folder it writes and
what a user needs to feed it (bundle.py), and prediction through paddle.inference alone
(inference.py, predictions.py), with evaluation's preprocessing and no model code."""
