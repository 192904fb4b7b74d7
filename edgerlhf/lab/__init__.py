"""The measuring tools: they run the library's stages and report figures; nothing in the service imports them.

    bench.py         `edgerlhf bench`: peak memory and speed of every stage, ours against TRL's trainers
    plan_check.py    `python -m edgerlhf.lab.plan_check`: the memory planner against the real stages' peaks
    known_answer.py  `edgerlhf known-answer`: every known-answer gold at several seeds, one table

They sit above the library (they import its stages; the stages never import them), as TRL keeps its
benchmarks beside the trainers rather than inside them. Each prints figures and asserts nothing about speed.
"""
