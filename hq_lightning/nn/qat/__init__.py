"""hq_lightning.nn.qat"""
