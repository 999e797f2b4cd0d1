"""The gateway: gRPC and OpenAI-compatible HTTP APIs (the "Services" issue). Imports only `common`."""
