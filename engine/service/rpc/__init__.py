"""Generated gRPC code for protos/tandem/v1/tandem.proto (``make proto``; do not edit)."""
