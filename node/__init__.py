"""The RAMster node daemon: one asyncio gRPC server around a zcache engine."""
