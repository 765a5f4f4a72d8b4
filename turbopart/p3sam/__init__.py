"""P3-SAM: promptable part segmentation and the automatic mask algorithm."""
