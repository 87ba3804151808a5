"""Image caption sets shipped with the library: short, hand-written for this project
(Apache-2.0).

One caption per line, 40 per set, plain descriptions without any style word, so that a style
or a concept added to them is the only difference between source and target prompts:
`people`, `animals`, `places`, `objects` and `times_of_day` (times of day and weather).
`act.diffusers.captions` reads them.
"""
