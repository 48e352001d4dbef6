"""Graph passes: the pipeline that runs the pattern rewrites on Inductor's post-grad graph (`pipeline`), and the
context a pattern records into while it runs (`context`)."""
