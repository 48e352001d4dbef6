"""Graph passes: the pipeline that runs the pattern rewrites on Inductor's post-grad graph (`pipeline`), the
context a pattern records into while it runs (`context`), and YOCO on Dynamo's graph (`yoco`, with its op
classification in `row_local`)."""
