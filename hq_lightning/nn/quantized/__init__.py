"""hq_lightning.nn.quantized"""
