"""The gateway's HTTP routes, one `APIRouter` (named `router`) per module, grouped by resource and
OpenAPI tag. `gateway.app.create_app` includes them in a fixed order, which is the order of the
route table and of the OpenAPI paths. Routes take their gRPC clients through `common.ClientsDep`
and map each request to one gRPC call; they hold no business logic."""
