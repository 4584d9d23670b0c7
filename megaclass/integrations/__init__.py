"""The fused op inside other libraries' models: `megaclass.integrations.transformers.patch(model)` makes a
transformers causal language model compute its loss with `megaclass.ops.linear_cross_entropy`."""
