"""Reading checkpoints and writing models and files: everything that touches the disk for a
model (the archive's own file format lives in `tvq_cli.archive`)."""
