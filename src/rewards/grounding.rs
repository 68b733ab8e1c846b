//! Grounding accuracy: IoU of boxes, Visual-RFT style (training.md section 3).
//!
//! **Parsing** ([`parse_boxes`]): the text must be JSON (after trimming), or become JSON once single
//! quotes are turned into double quotes; failing that, the substring from the first `[` (or `{`) to
//! the last `]` (or `}`) is tried the same way (so "boxes: [[1,2,3,4]]." parses). Accepted shapes:
//! * a list of boxes `[[x1,y1,x2,y2], ...]` or a bare box `[x1,y1,x2,y2]`;
//! * a list of objects `[{"Position": [x1,y1,x2,y2], "Confidence": 0.9}, ...]` or a single object;
//!   keys are case-insensitive, the box may be under `position`, `bbox_2d`, `bbox` or `box`, the
//!   confidence under `confidence`, `score` or `conf` (default 1.0; non-finite → 0.0);
//! * coordinates are JSON numbers or numeric strings; each pair is reordered so x1 <= x2, y1 <= y2.
//!
//! Anything else, or any malformed element, makes the whole list unparsable (reward 0).
//!
//! **Reward** ([`grounding_reward`]): predictions sorted by confidence (descending, stable) each take
//! the unmatched ground-truth box of highest IoU; the match counts only if IoU > 0.5 (the box is then
//! used). Reward = sum of matched IoUs / max(#gt, #pred), capped at 1; 0 when either side is
//! unparsable and when both lists are empty. IoU uses continuous areas (no +1 pixel convention), so it
//! works for pixel and normalised coordinates alike.

use serde_json::Value;

/// A box `[x1, y1, x2, y2]` with its confidence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredBox {
    pub bbox: [f64; 4],
    pub confidence: f64,
}

/// IoU threshold a prediction must exceed to match a ground-truth box.
pub const IOU_MATCH_THRESHOLD: f64 = 0.5;

fn as_f64(v: &Value) -> Option<f64> {
    let x = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    x.is_finite().then_some(x)
}

fn as_box(v: &Value) -> Option<[f64; 4]> {
    let a = v.as_array()?;
    if a.len() != 4 {
        return None;
    }
    let c: Vec<f64> = a.iter().map(as_f64).collect::<Option<_>>()?;
    Some([
        c[0].min(c[2]),
        c[1].min(c[3]),
        c[0].max(c[2]),
        c[1].max(c[3]),
    ])
}

fn get_ci<'a>(obj: &'a serde_json::Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| {
        obj.iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(k))
            .map(|(_, v)| v)
    })
}

fn as_scored(v: &Value) -> Option<ScoredBox> {
    match v {
        Value::Array(_) => as_box(v).map(|bbox| ScoredBox {
            bbox,
            confidence: 1.0,
        }),
        Value::Object(o) => {
            let bbox = as_box(get_ci(o, &["position", "bbox_2d", "bbox", "box"])?)?;
            let confidence = match get_ci(o, &["confidence", "score", "conf"]) {
                None | Some(Value::Null) => 1.0,
                Some(c) => match c {
                    Value::Number(n) => n.as_f64().filter(|x| x.is_finite()).unwrap_or(0.0),
                    Value::String(s) => s
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|x| x.is_finite())
                        .unwrap_or(0.0),
                    _ => return None,
                },
            };
            Some(ScoredBox { bbox, confidence })
        }
        _ => None,
    }
}

fn boxes_from_value(v: &Value) -> Option<Vec<ScoredBox>> {
    match v {
        Value::Object(_) => Some(vec![as_scored(v)?]),
        Value::Array(items) => {
            if let Some(bbox) = as_box(v) {
                // a bare box [x1, y1, x2, y2]
                return Some(vec![ScoredBox {
                    bbox,
                    confidence: 1.0,
                }]);
            }
            items.iter().map(as_scored).collect()
        }
        _ => None,
    }
}

fn parse_json_lenient(text: &str) -> Option<Value> {
    serde_json::from_str::<Value>(text)
        .ok()
        .or_else(|| serde_json::from_str::<Value>(&text.replace('\'', "\"")).ok())
}

/// Parse a list of boxes (see the module docs); `None` when unparsable.
pub fn parse_boxes(text: &str) -> Option<Vec<ScoredBox>> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    if let Some(boxes) = parse_json_lenient(t).as_ref().and_then(boxes_from_value) {
        return Some(boxes);
    }
    for (open, close) in [('[', ']'), ('{', '}')] {
        if let (Some(a), Some(b)) = (t.find(open), t.rfind(close)) {
            if a < b {
                if let Some(boxes) = parse_json_lenient(&t[a..=b])
                    .as_ref()
                    .and_then(boxes_from_value)
                {
                    return Some(boxes);
                }
            }
        }
    }
    None
}

/// Whether `text` parses as a (non-empty) list of boxes: used by task inference.
pub fn looks_like_boxes(text: &str) -> bool {
    let t = text.trim();
    (t.starts_with('[') || t.starts_with('{')) && parse_boxes(t).is_some_and(|b| !b.is_empty())
}

/// Intersection over union of two boxes `[x1, y1, x2, y2]`, in [0, 1] (0 for degenerate boxes).
pub fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let area = |r: &[f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    let v = inter / union;
    if union > 0.0 && v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// The grounding reward of parsed boxes (see the module docs).
pub fn match_boxes(pred: &[ScoredBox], gt: &[ScoredBox]) -> f64 {
    let denom = pred.len().max(gt.len());
    if denom == 0 {
        return 0.0;
    }
    let mut order: Vec<&ScoredBox> = pred.iter().collect();
    order.sort_by(|a, b| b.confidence.total_cmp(&a.confidence)); // stable
    let mut used = vec![false; gt.len()];
    let mut total = 0.0;
    for p in order {
        let mut best: Option<(usize, f64)> = None;
        for (i, g) in gt.iter().enumerate() {
            if used[i] {
                continue;
            }
            let v = iou(&p.bbox, &g.bbox);
            if best.is_none_or(|(_, b)| v > b) {
                best = Some((i, v));
            }
        }
        if let Some((i, v)) = best {
            if v > IOU_MATCH_THRESHOLD {
                used[i] = true;
                total += v;
            }
        }
    }
    (total / denom as f64).clamp(0.0, 1.0)
}

/// IoU reward of a predicted box list against the ground truth; 0 when either is unparsable.
pub fn grounding_reward(pred: &str, gt: &str) -> f64 {
    match (parse_boxes(pred), parse_boxes(gt)) {
        (Some(p), Some(g)) => match_boxes(&p, &g),
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_accepted_shapes() {
        let one = [ScoredBox {
            bbox: [1.0, 2.0, 3.0, 4.0],
            confidence: 1.0,
        }];
        assert_eq!(parse_boxes("[1, 2, 3, 4]").unwrap(), one);
        assert_eq!(parse_boxes("[[1, 2, 3, 4]]").unwrap(), one);
        assert_eq!(parse_boxes("[3, 4, 1, 2]").unwrap(), one); // reordered
        assert_eq!(
            parse_boxes(r#"{"Position": [1,2,3,4], "Confidence": 1}"#).unwrap(),
            one
        );
        assert_eq!(
            parse_boxes("[{'Position': [1,2,3,4], 'Confidence': 0.5}]").unwrap()[0].confidence,
            0.5
        );
        assert_eq!(
            parse_boxes(r#"[{"bbox_2d": [1,2,3,4], "label": "lesion"}]"#).unwrap(),
            one
        );
        assert_eq!(parse_boxes("The boxes are [[1,2,3,4]].").unwrap(), one);
        assert_eq!(
            parse_boxes(r#"[{"position": ["1","2","3","4"]}]"#).unwrap(),
            one
        );
        assert_eq!(parse_boxes("[]").unwrap(), vec![]);
    }

    #[test]
    fn unparsable_is_none() {
        for s in [
            "",
            "no box",
            "[1,2,3]",
            "[[1,2,3,4],[1,2]]",
            "[{'Pos': [1,2,3,4]}]",
            "[1,2,3,'x']",
            "{",
            "null",
            "5",
        ] {
            assert!(parse_boxes(s).is_none(), "{s:?}");
            assert_eq!(grounding_reward(s, "[1,2,3,4]"), 0.0);
            assert_eq!(grounding_reward("[1,2,3,4]", s), 0.0);
        }
    }

    #[test]
    fn iou_values() {
        assert_eq!(iou(&[0.0, 0.0, 10.0, 10.0], &[0.0, 0.0, 10.0, 10.0]), 1.0);
        assert!(
            (iou(&[0.0, 0.0, 10.0, 10.0], &[5.0, 0.0, 15.0, 10.0]) - 50.0 / 150.0).abs() < 1e-12
        );
        assert_eq!(iou(&[0.0, 0.0, 1.0, 1.0], &[2.0, 2.0, 3.0, 3.0]), 0.0);
        assert_eq!(iou(&[0.0, 0.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 0.0]), 0.0);
    }

    #[test]
    fn matching_and_normalisation() {
        let gt = "[[0,0,10,10],[20,20,30,30]]";
        assert_eq!(grounding_reward(gt, gt), 1.0);
        // one of two found exactly
        assert!((grounding_reward("[[0,0,10,10]]", gt) - 0.5).abs() < 1e-12);
        // an extra false positive dilutes
        assert!(
            (grounding_reward("[[0,0,10,10],[50,50,60,60]]", "[[0,0,10,10]]") - 0.5).abs() < 1e-12
        );
        // IoU 1/3 is below the threshold: no match
        assert_eq!(grounding_reward("[5,0,15,10]", "[0,0,10,10]"), 0.0);
        // IoU 0.8 > 0.5 counts with its value
        assert!((grounding_reward("[0,0,10,8]", "[0,0,10,10]") - 0.8).abs() < 1e-12);
        assert_eq!(grounding_reward("[]", "[]"), 0.0);
        assert_eq!(grounding_reward("[]", gt), 0.0);
    }

    #[test]
    fn higher_confidence_claims_first() {
        // both predictions best match gt box 0; the confident one (listed second) takes it
        let gt = "[[0,0,10,10]]";
        let pred = r#"[{"Position":[0,0,10,6],"Confidence":0.1},{"Position":[0,0,10,9],"Confidence":0.9}]"#;
        assert!((grounding_reward(pred, gt) - 0.9 / 2.0).abs() < 1e-12);
        // equal confidences keep list order (stable)
        let pred = r#"[{"Position":[0,0,10,6],"Confidence":0.5},{"Position":[0,0,10,9],"Confidence":0.5}]"#;
        assert!((grounding_reward(pred, gt) - 0.6 / 2.0).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn reward_in_unit_interval(
            p in proptest::collection::vec((-50.0f64..50.0, -50.0f64..50.0, -50.0f64..50.0, -50.0f64..50.0, 0.0f64..1.0), 0..5),
            g in proptest::collection::vec((-50.0f64..50.0, -50.0f64..50.0, -50.0f64..50.0, -50.0f64..50.0), 0..5),
        ) {
            let pred: Vec<ScoredBox> = p.iter().map(|&(a, b, c, d, s)| ScoredBox { bbox: [a.min(c), b.min(d), a.max(c), b.max(d)], confidence: s }).collect();
            let gt: Vec<ScoredBox> = g.iter().map(|&(a, b, c, d)| ScoredBox { bbox: [a.min(c), b.min(d), a.max(c), b.max(d)], confidence: 1.0 }).collect();
            let r = match_boxes(&pred, &gt);
            prop_assert!((0.0..=1.0).contains(&r));
            let self_r = match_boxes(&gt, &gt);
            prop_assert!((0.0..=1.0).contains(&self_r));
        }

        #[test]
        fn arbitrary_text_never_panics(a in "\\PC{0,60}", b in "\\PC{0,60}") {
            let r = grounding_reward(&a, &b);
            prop_assert!((0.0..=1.0).contains(&r));
        }
    }
}
