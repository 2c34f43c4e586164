"""Evaluation as library code (no argparse): option scoring, batched generation, the posterior predictive,
votes and the calibration glue. ``peft_bayes.cli`` parses flags and prints; benches import from here."""
