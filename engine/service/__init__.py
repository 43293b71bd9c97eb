"""The network face of the engine: the gRPC server (:mod:`engine.service.server`: the
server, its interceptor, shutdown and logs), the servicers that translate each rpc into
one engine call (:mod:`engine.service.servicers`), the engine being served and its hot
reload (:mod:`engine.service.holder`), metrics (:mod:`engine.service.metrics`), the
Python client (:mod:`engine.service.client`), server process groups
(:mod:`engine.service.processes`) and the generated protobuf code
(:mod:`engine.service.rpc`, from ``protos/tandem/v1/tandem.proto``)."""
