//! A trunk divided over two real trunk servers on loopback TLS (layers 2..15 and 15..28): the
//! device relays every step through both, each hop a session of its own with its own keys, and
//! the text equals a single trunk's token for token; a hop killed mid-generation (each in
//! turn) is rebuilt by replay on that hop alone; drafted steps of several tokens, and the
//! rewinds of rejected drafts, pass through both hops; each hop batches the steps of
//! concurrent sessions.

use lsplit_remote::RemoteTrunk;
use lsplit_server::DevCertificates;
use lsplit_split::{
    DividedTrunk, GenerateOptions, Hop, Obfuscation, SessionKeys, Speculate, Trunk,
};
use lsplit_testkit::llm::*;
use lsplit_testkit::{RunningServer, certificates};
use lsplit_wire::Codec;

/// The hops' layers, in order.
const HOPS: [(usize, usize); 2] = [(2, 15), (15, 28)];

/// A session of `keys` over `servers` (one per hop, in order), each hop passed through
/// `wrap` with its index, its server and its trunk.
fn divided(
    certs: &DevCertificates,
    keys: &SessionKeys,
    servers: Vec<RunningServer>,
    mut wrap: impl FnMut(usize, RunningServer, Box<dyn Trunk>) -> Box<dyn Trunk>,
) -> DividedTrunk {
    let hops = servers
        .into_iter()
        .enumerate()
        .map(|(index, server)| {
            let (k1, k2) = HOPS[index];
            let hop_keys = keys
                .for_hop(k1..k2, index == 0, index == 1)
                .expect("hop keys");
            let options = client_options(&server, certs, Codec::F32);
            let remote = RemoteTrunk::connect(options).expect("connect to the hop");
            let trunk = Box::new(remote.with_keys(hop_keys.clone()));
            Hop {
                trunk: wrap(index, server, trunk),
                keys: hop_keys,
            }
        })
        .collect();
    DividedTrunk::new(keys.clone(), hops).expect("divided trunk")
}

/// One server per hop, trusted through `certs`.
fn servers(certs: &DevCertificates) -> Vec<RunningServer> {
    let path = model_path();
    HOPS.iter()
        .map(|&(k1, k2)| serve(&path, k1, k2, tls_options(certs)))
        .collect()
}

#[test]
fn two_hops_give_a_single_trunks_text_and_survive_each_hop_being_killed() {
    let path = model_path();
    let certs = certificates();
    let model = device_model(&path, 2, 28, Codec::F32);
    let expected = in_process(&path, 2, 28, Codec::F32);

    let keys = model.new_keys(Obfuscation::None).expect("keys");
    let kept = divided(&certs, &keys, servers(&certs), |_, server, trunk| {
        // The servers live as long as their hop.
        Box::new(Kept {
            trunk,
            _server: server,
        })
    });
    assert_eq!(kept.layers(), 2..28);
    assert_eq!(
        generate_keyed(&model, Box::new(kept), &keys, PROMPT),
        expected
    );

    for killed in 0..HOPS.len() {
        let keys = model.new_keys(Obfuscation::Permute).expect("keys");
        let trunk = divided(&certs, &keys, servers(&certs), |index, server, trunk| {
            if index == killed {
                let options = tls_options(&certs);
                Box::new(RestartedMidway::new(trunk, server, 5, &path, options))
            } else {
                Box::new(Kept {
                    trunk,
                    _server: server,
                })
            }
        });
        assert_eq!(
            generate_keyed(&model, Box::new(trunk), &keys, PROMPT),
            expected,
            "hop {} killed at its fifth step",
            killed + 1
        );
    }
}

#[test]
fn drafted_multi_token_steps_and_their_rewinds_flow_through_every_hop() {
    let path = model_path();
    let certs = certificates();
    let model = device_model(&path, 2, 28, Codec::F32);
    let rewrite = "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog.";
    let prompt = model.prompt_tokens(rewrite, true).expect("prompt");
    let run = |speculate| {
        let keys = model.new_keys(Obfuscation::None).expect("keys");
        let trunk = divided(&certs, &keys, servers(&certs), |_, server, trunk| {
            Box::new(Kept {
                trunk,
                _server: server,
            })
        });
        let options = GenerateOptions {
            max_tokens: 24,
            speculate,
            ..GenerateOptions::default()
        };
        let mut session = model.session(Box::new(trunk), &keys).expect("session");
        session
            .generate(&prompt, &options, &mut |_| {})
            .expect("generate")
    };
    let (off, lookup) = (run(Speculate::Off), run(Speculate::Lookup));
    assert_eq!(lookup.tokens, off.tokens);
    assert!(lookup.stats.accepted_tokens > 0, "{:?}", lookup.stats);
    assert!(
        lookup.stats.drafted_tokens > lookup.stats.accepted_tokens,
        "some drafts were rejected, so the hops rewound: {:?}",
        lookup.stats
    );
}

#[test]
fn each_hop_batches_the_steps_of_concurrent_sessions_and_every_device_gets_its_solo_text() {
    let path = model_path();
    let certs = certificates();
    let model = device_model(&path, 2, 28, Codec::F32);
    let prompts = [
        "Once upon a time",
        "The capital of France is",
        "Water boils at",
        "1, 2, 3,",
    ];
    let part = local_trunk(&path, &model);
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| generate_from(&model, Box::new(part.clone()), p))
        .collect();
    let servers = servers(&certs);
    let barrier = std::sync::Barrier::new(prompts.len());
    let outputs: Vec<Vec<u32>> = std::thread::scope(|scope| {
        let devices: Vec<_> = prompts
            .iter()
            .map(|prompt| {
                let (barrier, servers, certs, model) = (&barrier, &servers, &certs, &model);
                scope.spawn(move || {
                    let keys = model.new_keys(Obfuscation::None).expect("keys");
                    let hops = servers
                        .iter()
                        .enumerate()
                        .map(|(index, server)| {
                            let (k1, k2) = HOPS[index];
                            let keys = keys.for_hop(k1..k2, index == 0, index == 1).expect("keys");
                            let options = client_options(server, certs, Codec::F32);
                            let remote = RemoteTrunk::connect(options).expect("connect");
                            let trunk = Box::new(remote.with_keys(keys.clone()));
                            Hop { trunk, keys }
                        })
                        .collect();
                    let trunk = DividedTrunk::new(keys.clone(), hops).expect("divided");
                    barrier.wait();
                    generate_keyed(model, Box::new(trunk), &keys, prompt)
                })
            })
            .collect();
        devices
            .into_iter()
            .map(|d| d.join().expect("device"))
            .collect()
    });
    assert_eq!(outputs, solo);
    for (index, server) in servers.iter().enumerate() {
        assert!(
            server.stats.batched_steps() > 0,
            "hop {} never batched two sessions' steps",
            index + 1
        );
    }
}

/// A hop's trunk that keeps its server running while it lives.
struct Kept {
    trunk: Box<dyn Trunk>,
    _server: RunningServer,
}

impl Trunk for Kept {
    fn layers(&self) -> std::ops::Range<usize> {
        self.trunk.layers()
    }

    fn step(
        &mut self,
        message: &lsplit_split::StepRows,
    ) -> Result<lsplit_split::StepRows, lsplit_split::TrunkError> {
        self.trunk.step(message)
    }
}
