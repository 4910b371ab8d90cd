"""The node: :class:`~hosfl_flower.node.client.HOSFLClient` and the store of its weight versions."""
