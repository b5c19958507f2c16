"""Tests of minivllm.observe, the tutorials and the example."""
