"""The network face of the engine: the gRPC server (:mod:`engine.service.server`), its
Python client (:mod:`engine.service.client`), server process groups
(:mod:`engine.service.processes`) and the generated protobuf code
(:mod:`engine.service.rpc`, from ``protos/tandem/v1/tandem.proto``)."""
