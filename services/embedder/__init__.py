"""The embedder service: image bytes in, VGG-16 feature vectors out (gRPC `cbir.v1.Embedder`).

`images` decodes and validates, `weights` finds the VGG-16 weights, `model` builds the Keras
network for a feature, `embedder.Embedder` ties them together (also used in-process by
`cbir index build`), `batcher` groups concurrent requests into one model call, `servicer` is the
gRPC face and `server` the start-up sequence behind `python -m services.embedder`.
"""
