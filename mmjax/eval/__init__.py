"""Evaluation suite: the synthetic VLM attention suite and needle-in-a-video-haystack."""
