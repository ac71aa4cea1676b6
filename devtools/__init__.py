"""Development and test tooling: the embedded broker, `make run`, crash points for the drills.

Nothing in berth/, tasks/, guest/ or workflows/ imports this package.
"""
