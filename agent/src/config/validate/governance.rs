//! The governance file, owned by the platform group: classes and the edge action each requires,
//! the topic template, egress allow-lists, required metadata and domain rules; and the check of
//! each product field's classification and action against them.

use super::*;
use crate::config::diag::closest;
use toml::Spanned;

fn check_template(cx: &mut Ctx, t: &Spanned<String>) -> bool {
    const KNOWN: [&str; 6] = ["site", "area", "line", "domain", "product", "major"];
    let mut ok = true;
    let mut rest = t.get_ref().as_str();
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            cx.err(t, "topic_template", "unclosed `{` in topic template");
            return false;
        };
        let name = &rest[open + 1..open + close];
        if !KNOWN.contains(&name) {
            let help = closest(name, KNOWN).map_or_else(
                || format!("known: {}", KNOWN.join(", ")),
                |b| format!("did you mean `{{{b}}}`?"),
            );
            cx.err(t, "topic_template", format!("unknown placeholder `{{{name}}}`"))
                .help = Some(help);
            ok = false;
        }
        rest = &rest[open + close + 1..];
    }
    if !t.get_ref().contains("{product}") {
        cx.err(
            t,
            "topic_template",
            "the topic template must contain `{product}` so products do not share a topic",
        );
        ok = false;
    }
    ok
}

/// The governance file's rules as product checks need them.
pub(super) struct Rules {
    pub plan: GovernancePlan,
    pub template: String,
    pub required: Vec<String>,
    pub domains: Vec<(String, Vec<String>)>,
    /// How messages name the governance file.
    pub file: String,
}

const ACTIONS: [&str; 5] = ["pass", "coarsen", "pseudonymise", "mask", "never"];

fn action_of(cx: &mut Ctx, name: &Spanned<String>, step: Option<&Spanned<f64>>, key: &str) -> Option<EdgeAction> {
    let options: Vec<(&str, &str)> = ACTIONS.iter().map(|a| (*a, *a)).collect();
    let a = cx.choice(name, key, &options)?;
    Some(match a {
        "pass" => EdgeAction::Pass,
        "coarsen" => match step {
            Some(s) if s.get_ref().is_finite() && *s.get_ref() > 0.0 => EdgeAction::Coarsen(*s.get_ref()),
            Some(s) => {
                cx.err(s, key.replace("action", "step"), "`step` must be a number > 0");
                return None;
            }
            None => {
                cx.err(
                    name,
                    key.replace("action", "step"),
                    "`coarsen` needs `step` (values are rounded to a multiple of it)",
                );
                return None;
            }
        },
        "pseudonymise" => EdgeAction::Pseudonymise,
        "mask" => EdgeAction::Mask,
        _ => EdgeAction::Never,
    })
}

pub(super) fn rules(cx: &mut Ctx, g: raw::Governance) -> Rules {
    let file = cx.src.path.display().to_string();
    let base = cx.src.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut plan = GovernancePlan {
        file: Some(cx.src.path.to_path_buf()),
        ..GovernancePlan::default()
    };
    let mut template = DEFAULT_TOPIC_TEMPLATE.to_string();
    if let Some(t) = &g.topic_template {
        if check_template(cx, t) {
            template = t.get_ref().clone();
        }
    }
    if !g.classes.is_empty() {
        plan.classes.clear();
        for (name, class) in &g.classes {
            if let Some(a) = action_of(
                cx,
                &class.action,
                class.step.as_ref(),
                &format!("classes.{name}.action"),
            ) {
                plan.classes.insert(name.clone(), a);
            }
        }
    }
    let class_names: Vec<String> = plan.classes.keys().cloned().collect();
    let known = |cx: &mut Ctx, c: &Spanned<String>, key: &str| {
        if !class_names.contains(c.get_ref()) {
            let help =
                closest(c.get_ref(), class_names.iter().map(String::as_str)).map(|b| format!("did you mean `{b}`?"));
            cx.err(c, key, format!("unknown classification `{}`", c.get_ref())).help = help;
            false
        } else {
            true
        }
    };
    if let Some(d) = &g.default_classification {
        if known(cx, d, "default_classification") {
            plan.default_class = d.get_ref().clone();
        }
    } else if !plan.classes.contains_key(&plan.default_class) {
        let first = plan.classes.keys().next().cloned().unwrap_or_default();
        cx.whole(
            "default_classification",
            format!("there is no class `internal`: set default_classification (e.g. \"{first}\")"),
        );
    }
    if !g.egress.allow_classes.is_empty() {
        let mut allowed = Vec::new();
        for (i, c) in g.egress.allow_classes.iter().enumerate() {
            if known(cx, c, &format!("egress.allow_classes[{i}]")) {
                allowed.push(c.get_ref().clone());
            }
        }
        plan.allow_classes = Some(allowed);
    }
    plan.allow_topic_prefixes = g
        .egress
        .allow_topic_prefixes
        .iter()
        .map(|p| p.get_ref().clone())
        .collect();
    plan.key_file = g.pseudonymise_key_file.as_ref().map(|k| base.join(k.get_ref()));
    let mut required = Vec::new();
    for (i, r) in g.required_metadata.iter().enumerate() {
        if let Some(name) = cx.choice(
            r,
            &format!("required_metadata[{i}]"),
            &[
                ("description", "description"),
                ("contact", "contact"),
                ("status", "status"),
                ("unit", "unit"),
            ],
        ) {
            required.push(name.to_string());
        }
    }
    let domains = g
        .domains
        .iter()
        .map(|d| {
            (
                d.domain.get_ref().clone(),
                d.topic_prefixes.iter().map(|p| p.get_ref().clone()).collect(),
            )
        })
        .collect();
    Rules {
        plan,
        template,
        required,
        domains,
        file,
    }
}

/// A field's classification and the edge action that applies to it; a product may tighten its
/// class's action, never weaken it.
pub(super) fn field_governance(
    cx: &mut Ctx,
    f: &raw::Field,
    key: &str,
    logical: LogicalType,
    rules: &Rules,
) -> Option<(String, EdgeAction)> {
    let class = match &f.classification {
        Some(c) => {
            if !rules.plan.classes.contains_key(c.get_ref()) {
                let help = closest(c.get_ref(), rules.plan.classes.keys().map(String::as_str))
                    .map(|b| format!("did you mean `{b}`?"));
                let msg = format!(
                    "unknown classification `{}` (the classes of {} are: {})",
                    c.get_ref(),
                    rules.file,
                    rules.plan.classes.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                cx.err(c, format!("{key}.classification"), msg).help = help;
                return None;
            }
            c.get_ref().clone()
        }
        None => rules.plan.default_class.clone(),
    };
    let required = rules.plan.classes[&class];
    let upstream = rules.plan.allow_classes.as_ref().is_none_or(|a| a.contains(&class));
    let mut action = if upstream { required } else { EdgeAction::Never };
    if let Some(a) = &f.action {
        let chosen = action_of(cx, a, f.step.as_ref(), &format!("{key}.action"))?;
        if chosen.rank() < action.rank() {
            let rule = if upstream {
                format!(
                    "rule `classes.{class}.action = \"{}\"` in {}",
                    required.name(),
                    rules.file
                )
            } else {
                format!(
                    "rule `egress.allow_classes` in {} (class `{class}` may not leave the site)",
                    rules.file
                )
            };
            let msg = format!(
                "`{}` weakens governance: class `{class}` requires `{}` ({rule})",
                chosen.name(),
                action.name()
            );
            cx.err(a, format!("{key}.action"), msg).help =
                Some(format!("use `{}` or a stricter action", action.name()));
            return None;
        }
        action = chosen;
    } else if let Some(s) = &f.step {
        cx.err(s, format!("{key}.step"), "`step` applies only to action = \"coarsen\"");
    }
    if matches!(action, EdgeAction::Coarsen(_)) && !matches!(logical, LogicalType::Number | LogicalType::Integer) {
        cx.err(
            &f.name,
            format!("{key}.action"),
            "`coarsen` applies only to numeric fields",
        );
        return None;
    }
    if action == EdgeAction::Pseudonymise && rules.plan.key_file.is_none() {
        let msg = format!(
            "field `{}` must be pseudonymised (class `{class}`), but {} names no `pseudonymise_key_file`",
            f.name.get_ref(),
            rules.file
        );
        cx.err(&f.name, format!("{key}.classification"), msg);
        return None;
    }
    Some((class, action))
}
