"""Runtime: what runs at call time around compiled graphs: the graph split (`split`), CUDA graphs per input shape
(`cudagraphs`) and verify mode (`verify`)."""
