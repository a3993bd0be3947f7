"""Built-in parts, each module an ordinary plugin registered through the hooks.

See :data:`distill_plugins.manager.DEFAULT_PLUGINS` for the load order.
"""
