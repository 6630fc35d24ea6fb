"""hq_lightning.nn.intrinsic"""
