//! The table driver on the real SmolLM2-135M-Instruct, one prompt and a fixed split 1:29: the
//! attacks read the whole session back, with or without the permutation, and the rows come in
//! the grid's order, each reported as it is done, and the split keeps the unsplit model's
//! utility exactly.

use std::sync::Arc;

use candle_core::Device;
use lsplit_attack::table::{self, Measure, Policies, Setting, Table};
use lsplit_attack::{Attacker, Scores};
use lsplit_model::ModelSource;
use lsplit_split::{Obfuscation, load_tokenizer};

const MAX_TOKENS: usize = 4;

#[test]
fn a_known_split_is_read_back_with_or_without_permutation() {
    let path = lsplit_fetch::ensure_default_model().expect("default model");
    let source = ModelSource::open(&path).expect("open");
    let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
    let fixed = Policies {
        fixed: true,
        random: false,
    };
    let settings = Setting::grid(&[1], fixed, 30, usize::MAX).expect("grid");
    let attacker = Attacker::new(
        &source,
        table::deepest(&settings),
        tokenizer.bos_token().unwrap_or(0),
        &Device::Cpu,
        &mut |_, _| {},
    )
    .expect("attacker");
    let scratch = tempfile::tempdir().expect("tempdir");
    let run = Table {
        source: &source,
        adapted: None,
        tokenizer,
        prompts: vec![table::PROMPTS[1].to_string()],
        max_tokens: MAX_TOKENS,
        inversion_budget: 4,
        scratch: scratch.path().join("capture"),
    };
    let mut prompts_done = 0;
    let mut reported: Vec<(Obfuscation, Scores)> = Vec::new();
    let rows = run
        .run(
            &attacker,
            &settings,
            &mut |_| prompts_done += 1,
            &mut |setting, measures| {
                reported.push((setting.obfuscation, Measure::total(measures).scores))
            },
        )
        .expect("table");
    for (i, m) in rows.iter().map(Measure::total).enumerate() {
        // f32 rows, no noise: the split is the unsplit model, token for token and bit for bit.
        assert_eq!(m.perplexity_ratio(), 1.0, "{m:?}");
        assert_eq!(m.agreement_percent(), 100.0, "{m:?}");
        assert_eq!(m.reference_tokens, MAX_TOKENS);
        // Every position but the last crosses once each way, 576 f32 values a row.
        assert_eq!(m.bytes, 2 * 576 * 4 * (m.positions as u64 - 1), "{m:?}");
        // The known-plaintext attacker knows K1 here: it reads the whole plain prompt too.
        let s = m.scores;
        if i == 0 {
            assert_eq!(
                s.known_plaintext.prompt, s.known_plaintext.prompt_total,
                "{s:?}"
            );
        }
        assert_eq!(m.best_prompt_attack(), (100.0, "matching"));
    }
    let rows: Vec<Scores> = rows.iter().map(|m| Measure::total(m).scores).collect();
    assert_eq!(prompts_done, 2);
    assert_eq!(
        reported.iter().map(|r| r.0).collect::<Vec<_>>(),
        [Obfuscation::None, Obfuscation::Permute]
    );
    assert_eq!(reported.iter().map(|r| r.1).collect::<Vec<_>>(), rows);
    for s in &rows {
        assert_eq!(s.matching.prompt, s.matching.prompt_total, "{s:?}");
        assert!(s.matching.prompt_total > 10, "{s:?}");
        // The last generated token never goes up: generation stops once it is sampled.
        assert_eq!(s.matching.generated, MAX_TOKENS - 1, "{s:?}");
        assert_eq!(s.replay.generated, MAX_TOKENS, "{s:?}");
        assert_eq!(s.replay.generated_total, MAX_TOKENS);
    }
    assert!(
        !scratch.path().join("capture").exists(),
        "the scratch is removed"
    );
}
