"""The optimize() pipeline's stages, one module each: convert, compile (and judge), select, publish.

`converters.pipeline._Run` combines them; each stage is a mixin over the run's shared state.
"""
