"""Block-sparse ops (``torch.ops.sparse_compiler.*``) and their implementations."""
