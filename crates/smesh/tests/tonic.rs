//! The HTTP client is what a tonic-generated client takes as its transport (tonic implements
//! `GrpcService` for tower services of its body type, which is not `Sync`). Checked when
//! this compiles; a gRPC call through it end to end is not tested yet.

fn transport<T: tonic::client::GrpcService<tonic::body::Body>>(_: &T) {}

#[test]
fn the_http_client_is_a_tonic_transport() {
    fn check(client: &smesh::HttpClient) {
        transport(client);
    }
    // Nothing to run: the bound above is the test.
    let _ = check;
}
