//! Fuzz target: how the agent decodes what arrives on its API, from arbitrary bytes.
//!
//! The first byte picks the decoder: the query of `POST /v1/volumes/NAME/receive`
//! (`ReceiveParams::parse`), the JSON body of `POST /v1/converge` (`ConvergeRequest`) or of
//! `POST /v1/volumes/NAME/handoff` (`TakeOverRequest`), all from `flocker-wire`, which the
//! agent decodes with. A request that decodes must also survive what the agent derives from
//! it before acting (the checks of every value, routes, a JSON round trip). Any panic is a
//! bug.
#![no_main]

use flocker_wire::ConvergeRequest;
use flocker_wire::checks::desired_problems;
use flocker_wire::transfer::{ReceiveParams, TakeOverRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let query = String::from_utf8_lossy(rest);
            if let Ok(params) = ReceiveParams::parse(&query) {
                let again = ReceiveParams::parse(&params.query());
                assert_eq!(again.as_ref(), Ok(&params), "query round trip");
            }
        }
        1 => {
            if let Ok(request) = serde_json::from_slice::<ConvergeRequest>(rest) {
                let _ = desired_problems(&request.desired);
                for node in request.desired.nodes.keys() {
                    let _ = request.desired.routes_for(node);
                }
                let json = serde_json::to_vec(&request).expect("a decoded request encodes");
                let again: ConvergeRequest =
                    serde_json::from_slice(&json).expect("an encoded request decodes");
                assert_eq!(again, request, "JSON round trip changed the request");
            }
        }
        _ => {
            if let Ok(request) = serde_json::from_slice::<TakeOverRequest>(rest) {
                let json = serde_json::to_vec(&request).expect("encodes");
                let again: TakeOverRequest = serde_json::from_slice(&json).expect("decodes");
                assert_eq!(again, request);
            }
        }
    }
});
