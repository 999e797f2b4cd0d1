"""Generated gRPC stubs of proto/ (scripts/gen_proto.sh): `from common.proto.tessera.v1 import
worker_pb2`. Only common/convert.py and the services' gRPC glue touch these classes; everything
else works on the dataclasses of common/step.py and common/sampling_params.py."""
