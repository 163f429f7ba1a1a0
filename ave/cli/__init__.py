"""``ave``: the lab user's command (``ave-broker`` is the daemon's).

``main`` parses the command line and dispatches; each concern has its module:
``profiles`` reads PROFILE arguments, ``table`` formats listings, ``connect`` finds
the broker and home, ``listing`` lists equipment, holders and the queue,
``holding`` holds, runs, switches relays and kicks, ``console`` drives a serial
console, ``completion`` writes the bash completion script.
"""
