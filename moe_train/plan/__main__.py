"""python -m moe_train.plan model=... router=... cluster.world_size=..."""

from .cli import main

main()
