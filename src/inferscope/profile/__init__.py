"""Where the time of a stage goes: cProfile split by stage (``inferscope profile``, ``staged.py``),
and, in production, a short sampling of the stacks of a stage that regressed (``sampler.py``).

See docs/profile.md.
"""
