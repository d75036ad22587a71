//! The governance file, owned by the platform group: classes and the edge action each requires,
//! the topic template, egress allow-lists, required metadata and domain rules; and the check of
//! each product field's classification and action against them.

use super::*;
use crate::config::diag::closest;
use toml::Spanned;

/// The placeholders of the product topic template; the UNS template adds `topic` and `field`.
const PRODUCT_PLACEHOLDERS: [&str; 8] = [
    "enterprise",
    "site",
    "area",
    "line",
    "cell",
    "domain",
    "product",
    "major",
];

/// Checks a topic template at `key`: only `known` placeholders, and at least one of `needs`
/// (without which what `shared` names would share a topic).
fn check_template(
    cx: &mut Ctx,
    t: &Spanned<String>,
    key: &str,
    known: &[&str],
    (needs, shared): (&[&str], &str),
) -> bool {
    let mut ok = true;
    let mut rest = t.get_ref().as_str();
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            cx.err(t, key, "unclosed `{` in topic template");
            return false;
        };
        let name = &rest[open + 1..open + close];
        if !known.contains(&name) {
            let help = closest(name, known.iter().copied()).map_or_else(
                || format!("known: {}", known.join(", ")),
                |b| format!("did you mean `{{{b}}}`?"),
            );
            cx.err(t, key, format!("unknown placeholder `{{{name}}}`")).help = Some(help);
            ok = false;
        }
        rest = &rest[open + close + 1..];
    }
    if !needs.iter().any(|n| t.get_ref().contains(&format!("{{{n}}}"))) {
        let what = needs
            .iter()
            .map(|n| format!("`{{{n}}}`"))
            .collect::<Vec<_>>()
            .join(" or ");
        cx.err(
            t,
            key,
            format!("the template must contain {what}, or {shared} would share a topic"),
        );
        ok = false;
    }
    if t.get_ref().contains(['+', '#']) {
        cx.err(
            t,
            key,
            "`+` and `#` are MQTT wildcards: a topic to publish on may not contain them",
        );
        ok = false;
    }
    ok
}

/// The governance file's rules as product checks need them.
pub(super) struct Rules {
    pub plan: GovernancePlan,
    pub template: String,
    /// The UNS view's topic template (`uns_topic_template`), `{topic}/{field}` by default.
    pub uns_template: String,
    pub required: Vec<String>,
    pub domains: Vec<(String, Vec<String>)>,
    /// How messages name the governance file.
    pub file: String,
    /// False when a governance file has no `[egress]` table: nothing may leave, which is reported
    /// once at the file rather than at every product.
    pub egress_written: bool,
}

impl Rules {
    /// The built-in rules (`[agent] governance = "builtin-defaults"`, or no governance file yet).
    pub fn builtin() -> Rules {
        Rules {
            plan: GovernancePlan::default(),
            template: DEFAULT_TOPIC_TEMPLATE.to_string(),
            uns_template: DEFAULT_UNS_TOPIC_TEMPLATE.to_string(),
            required: Vec::new(),
            domains: Vec::new(),
            file: "the built-in governance defaults".into(),
            egress_written: true,
        }
    }
}

impl Rules {
    /// True when `c` is a class of the governance file; else reports it, with the nearest name.
    pub fn known_class(&self, cx: &mut Ctx, c: &Spanned<String>, key: &str) -> bool {
        if self.plan.classes.contains_key(c.get_ref()) {
            return true;
        }
        let help =
            closest(c.get_ref(), self.plan.classes.keys().map(String::as_str)).map(|b| format!("did you mean `{b}`?"));
        let msg = format!(
            "unknown classification `{}` (the classes of {} are: {})",
            c.get_ref(),
            self.file,
            self.plan.classes.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        cx.err(c, key, msg).help = help;
        false
    }
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

/// Fail closed: a config runs without a governance file only when its gateway file says so by
/// name (`[agent] governance = "builtin-defaults"`), and says so only when there is none.
pub(super) fn builtin_choice(cx: &mut Ctx, choice: Option<&Spanned<String>>, file: Option<&PathBuf>) {
    match (choice, file) {
        (None, Some(_)) => {}
        (None, None) => {
            cx.whole(
                "agent.governance",
                "no governance.toml: without rules nothing may run (fail closed)",
            );
            if let Some(d) = cx.problems.last_mut() {
                d.help = Some(
                    "write governance.toml beside agent.toml, or set `governance = \"builtin-defaults\"` under [agent] to run on the built-in rules (public and internal pass, confidential masked, restricted never leaves, any topic)"
                        .into(),
                );
            }
        }
        (Some(c), file) => {
            if cx.choice(c, "agent.governance", &[("builtin-defaults", ())]).is_some() {
                if let Some(f) = file {
                    cx.err(
                        c,
                        "agent.governance",
                        format!("`builtin-defaults` but there is a governance file, {}", f.display()),
                    )
                    .help = Some("remove this key to run on the governance file, or remove the file".into());
                }
            }
        }
    }
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
        if check_template(
            cx,
            t,
            "topic_template",
            &PRODUCT_PLACEHOLDERS,
            (&["product"], "products"),
        ) {
            template = t.get_ref().clone();
        }
    }
    let mut uns_template = DEFAULT_UNS_TOPIC_TEMPLATE.to_string();
    if let Some(t) = &g.uns_topic_template {
        let mut known = PRODUCT_PLACEHOLDERS.to_vec();
        known.extend(["topic", "field"]);
        let fields = check_template(cx, t, "uns_topic_template", &known, (&["field"], "fields"));
        let products = &["product", "topic"];
        if fields && check_template(cx, t, "uns_topic_template", &known, (products, "products")) {
            uns_template = t.get_ref().clone();
        }
    }
    // A governance file says everything it means: nothing is taken from the built-in defaults.
    plan.classes.clear();
    if g.classes.is_empty() {
        cx.whole(
            "classes",
            "no classes: a governance file defines every classification and its action (nothing is taken from the built-in defaults)",
        );
        if let Some(d) = cx.problems.last_mut() {
            d.help =
                Some("e.g. [classes.internal] action = \"pass\" and [classes.restricted] action = \"never\"".into());
        }
    }
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
    } else if !plan.classes.contains_key(&plan.default_class) && !g.classes.is_empty() {
        let first = plan.classes.keys().next().cloned().unwrap_or_default();
        cx.whole(
            "default_classification",
            format!("there is no class `internal`: set default_classification (e.g. \"{first}\")"),
        );
    }
    let none = raw::Egress::default();
    let egress_written = g.egress.is_some();
    let egress = g.egress.as_ref().unwrap_or(&none);
    if !egress_written {
        cx.whole(
            "egress",
            "no [egress] table: nothing may leave the site (egress allows only what is written)",
        );
        if let Some(d) = cx.problems.last_mut() {
            d.help = Some("add [egress] allow_topic_prefixes = [\"<site>/\"] (or [\"#\"] for any topic)".into());
        }
    }
    if !egress.allow_classes.is_empty() {
        let mut allowed = Vec::new();
        for (i, c) in egress.allow_classes.iter().enumerate() {
            if known(cx, c, &format!("egress.allow_classes[{i}]")) {
                allowed.push(c.get_ref().clone());
            }
        }
        plan.allow_classes = Some(allowed);
    }
    plan.allow_topic_prefixes.clear();
    for (i, p) in egress.allow_topic_prefixes.iter().enumerate() {
        match p.get_ref().as_str() {
            // The one catch-all, written on purpose.
            "#" => plan.allow_topic_prefixes.push(String::new()),
            "" => {
                cx.err(
                    p,
                    format!("egress.allow_topic_prefixes[{i}]"),
                    "an empty prefix would allow every topic",
                )
                .help = Some("write \"#\" to allow any topic on purpose".into());
            }
            prefix => plan.allow_topic_prefixes.push(prefix.to_string()),
        }
    }
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
        uns_template,
        required,
        domains,
        file,
        egress_written,
    }
}

/// The least treatment a field must get, inherited from where its value comes from: the tag it
/// reads (its class in the gateway file, or the strictest class another field gives the same tag),
/// or the inputs it derives from.
#[derive(Debug, Clone)]
pub(super) struct Floor {
    pub class: String,
    pub action: EdgeAction,
    /// Where the floor comes from, for messages: "tag `plc.badge`, classified `personal` in agent.toml".
    pub why: String,
}

/// A field's classification and the edge action that applies to it. Classification belongs to the
/// source: a field takes the class of what it reads (`floor`) unless it names one, and may only make
/// it stricter (a stricter class or action, a coarser whole-multiple step), never weaker.
pub(super) fn field_governance(
    cx: &mut Ctx,
    f: &raw::Field,
    key: &str,
    logical: LogicalType,
    rules: &Rules,
    floor: Option<&Floor>,
) -> Option<(String, EdgeAction)> {
    let class = match &f.classification {
        Some(c) => {
            if !rules.known_class(cx, c, &format!("{key}.classification")) {
                return None;
            }
            c.get_ref().clone()
        }
        // The source's class, unless it is weaker than the default: a floor only ever tightens.
        None => {
            let default = rules.plan.default_class.clone();
            match (floor, class_action(rules, &default)) {
                (Some(fl), Some(d)) if fl.action.at_least(d) => fl.class.clone(),
                (Some(fl), None) => fl.class.clone(),
                _ => default,
            }
        }
    };
    // A class whose own rule is invalid is not in the plan: that rule's error is already reported.
    let &required = rules.plan.classes.get(&class)?;
    let upstream = rules.plan.allow_classes.as_ref().is_none_or(|a| a.contains(&class));
    let mut action = if upstream { required } else { EdgeAction::Never };
    let mut rule = if upstream {
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
    if let Some(fl) = floor {
        if let (Some(c), false) = (&f.classification, action.at_least(fl.action)) {
            let msg = format!(
                "class `{class}` is weaker than what field `{}` reads: {} requires `{}`{}",
                f.name.get_ref(),
                fl.why,
                fl.action.name(),
                step_text(fl.action)
            );
            // The classes that would do: those whose own rule treats the value at least as strictly.
            let enough: Vec<String> = rules
                .plan
                .classes
                .keys()
                .filter(|k| class_action(rules, k).is_some_and(|a| a.at_least(fl.action)))
                .map(|k| format!("`{k}`"))
                .collect();
            cx.err(c, format!("{key}.classification"), msg).help = Some(if enough.is_empty() {
                format!(
                    "a field may only make its source's treatment stricter: leave out `classification` (the field then gets `{}`)",
                    fl.action.name()
                )
            } else {
                format!(
                    "a field may only make its source's treatment stricter: leave out `classification` (the field then gets `{}`), or use {}",
                    fl.action.name(),
                    enough.join(" or ")
                )
            });
            return None;
        }
        match action.stricter(fl.action) {
            Some(a) => {
                if a != action {
                    rule.clone_from(&fl.why);
                }
                action = a;
            }
            None => {
                let msg = format!(
                    "field `{}` would be coarsened to a step of {} by class `{class}` and of {} by {}: no one step covers both",
                    f.name.get_ref(),
                    coarsen_step(action),
                    coarsen_step(fl.action),
                    fl.why
                );
                cx.err(&f.name, format!("{key}.action"), msg).help = Some(
                    "set action = \"coarsen\" with a step that is a whole multiple of both, or a stricter action"
                        .into(),
                );
                return None;
            }
        }
    }
    if let Some(a) = &f.action {
        let chosen = action_of(cx, a, f.step.as_ref(), &format!("{key}.action"))?;
        if !chosen.at_least(action) {
            let msg = match (chosen, action) {
                (EdgeAction::Coarsen(x), EdgeAction::Coarsen(y)) => format!(
                    "`coarsen` with step {x} weakens governance: class `{class}` requires `coarsen` to a step of {y} or a whole multiple of it ({rule})"
                ),
                _ => format!(
                    "`{}` weakens governance: class `{class}` requires `{}` ({rule})",
                    chosen.name(),
                    action.name()
                ),
            };
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

fn coarsen_step(a: EdgeAction) -> f64 {
    match a {
        EdgeAction::Coarsen(step) => step,
        _ => 0.0,
    }
}

/// " to a step of N" for a coarsening, else nothing.
fn step_text(a: EdgeAction) -> String {
    match a {
        EdgeAction::Coarsen(step) => format!(" to a step of {step} or a whole multiple of it"),
        _ => String::new(),
    }
}

/// The treatment a named class gives, as far as the rules allow it upstream at all.
fn class_action(rules: &Rules, class: &str) -> Option<EdgeAction> {
    let &action = rules.plan.classes.get(class)?;
    let upstream = rules
        .plan
        .allow_classes
        .as_ref()
        .is_none_or(|a| a.iter().any(|c| c == class));
    Some(if upstream { action } else { EdgeAction::Never })
}

/// A field's own action, when it names a valid one (its errors are reported when it is planned).
fn written_action(f: &raw::Field) -> Option<EdgeAction> {
    Some(match f.action.as_ref()?.get_ref().as_str() {
        "pass" => EdgeAction::Pass,
        "coarsen" => match f.step.as_ref().map(|s| *s.get_ref()) {
            Some(step) if step.is_finite() && step > 0.0 => EdgeAction::Coarsen(step),
            _ => return None,
        },
        "pseudonymise" => EdgeAction::Pseudonymise,
        "mask" => EdgeAction::Mask,
        "never" => EdgeAction::Never,
        _ => return None,
    })
}

/// The least treatment of every classified tag: the class the gateway file gives it, made as strict
/// as the strictest treatment any product gives a field reading it (class and action). Two coarsen
/// steps neither of which is a whole multiple of the other keep the coarser one.
pub(super) fn tag_floors(
    table: &TagTable,
    by_ref: &HashMap<String, usize>,
    devices: &[crate::sources::DevicePlan],
    products: &[(crate::config::diag::Source, raw::Product)],
    rules: &Rules,
) -> HashMap<usize, Floor> {
    let mut floors: HashMap<usize, Floor> = HashMap::new();
    let mut raise = |tag: usize, candidate: Floor| match floors.get(&tag) {
        None => {
            floors.insert(tag, candidate);
        }
        Some(prev) => {
            let keep_prev = match prev.action.stricter(candidate.action) {
                Some(a) => a == prev.action,
                None => coarsen_step(prev.action) >= coarsen_step(candidate.action),
            };
            if !keep_prev {
                floors.insert(tag, candidate);
            }
        }
    };
    for (&tag, class) in &table.classes {
        let Some(action) = class_action(rules, class.get_ref()) else {
            continue; // unknown class: reported at the tag
        };
        let t = &table.tags[tag];
        let device = devices.get(t.device()).map_or("?", |d| d.id.as_str());
        raise(
            tag,
            Floor {
                class: class.get_ref().clone(),
                action,
                why: format!(
                    "tag `{device}.{}`, classified `{}` in the gateway file",
                    t.name,
                    class.get_ref()
                ),
            },
        );
    }
    for (src, p) in products {
        for f in &p.fields {
            let Some(source) = &f.source else { continue };
            let Some(&tag) = by_ref.get(source.get_ref()) else {
                continue;
            };
            // Every reader's treatment counts, whether it names a class, only an action, or
            // neither (the default class): two readers of one tag get at least the same treatment.
            let class = f
                .classification
                .as_ref()
                .map_or(rules.plan.default_class.as_str(), |c| c.get_ref().as_str());
            let Some(by_class) = class_action(rules, class) else {
                continue; // unknown class: reported at the field
            };
            let action = match written_action(f) {
                Some(a) => a.stricter(by_class).unwrap_or(a),
                None => by_class,
            };
            let said = match (&f.classification, &f.action) {
                (Some(_), _) => format!("classifies `{class}`"),
                (None, Some(_)) => format!("treats as `{}`{}", action.name(), step_text(action)),
                (None, None) => format!("leaves to the default class `{class}`"),
            };
            raise(
                tag,
                Floor {
                    class: class.to_string(),
                    action,
                    why: format!(
                        "tag `{}`, which field `{}` of product `{}` ({}) {said}",
                        source.get_ref(),
                        f.name.get_ref(),
                        p.id.get_ref(),
                        src.path.display(),
                    ),
                },
            );
        }
    }
    floors
}

#[cfg(test)]
mod tests {
    use crate::config::{load_texts, EdgeAction};
    use std::path::Path;

    const GATEWAY: &str = "[agent]\nid = \"gw\"\nsite = \"s\"\narea = \"a\"\nline = \"l\"\n\
        [[devices]]\nid = \"plc\"\nprotocol = \"modbus_tcp\"\naddress = \"127.0.0.1:502\"\n\
        [[devices.tags]]\nname = \"temp\"\ntable = \"holding\"\naddress = 0\n";
    const GOVERNANCE: &str = "default_classification = \"internal\"\n\
        [classes.public]\naction = \"pass\"\n[classes.internal]\naction = \"mask\"\n\
        [egress]\nallow_topic_prefixes = [\"#\"]\n";

    fn product(id: &str, field: &str, class: Option<&str>) -> String {
        let class = class.map_or(String::new(), |c| format!("classification = \"{c}\"\n"));
        format!(
            "id = \"{id}\"\nname = \"P\"\nversion = \"1.0.0\"\ndomain = \"d\"\nowner = \"o\"\n\
             [[fields]]\nname = \"{field}\"\nsource = \"plc.temp\"\n{class}"
        )
    }

    /// Two readers of one tag get at least the same treatment: one team classifying its reader
    /// `public` neither lowers another team's reader, which names no class, below the default, nor
    /// publishes the value raw beside it; it is refused, naming the other reader.
    #[test]
    fn a_weaker_class_elsewhere_does_not_lower_the_default() {
        let a = product("a", "x", Some("public"));
        let b = product("b", "y", None);
        let load = |files: &[(&Path, &str)]| {
            load_texts(
                (Path::new("agent.toml"), GATEWAY),
                Some((Path::new("governance.toml"), GOVERNANCE)),
                files,
                Path::new("/nonexistent"),
            )
        };
        let err = load(&[(Path::new("a.toml"), &a), (Path::new("b.toml"), &b)]).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0].message.contains(
                "class `public` is weaker than what field `x` reads: tag `plc.temp`, which field `y` of product `b` (b.toml) leaves to the default class `internal` requires `mask`"
            ),
            "{err}"
        );
        let c = product("c", "z", None);
        let plan = load(&[(Path::new("b.toml"), &b), (Path::new("c.toml"), &c)]).unwrap();
        let action = |p: &str| plan.products.iter().find(|q| q.id == p).unwrap().fields[0].action;
        assert_eq!((action("b"), action("c")), (EdgeAction::Mask, EdgeAction::Mask));
    }

    fn load_uns(uns_template: &str, egress: &str, products: &[(&str, &str)]) -> Result<crate::config::Plan, String> {
        let governance = format!(
            "default_classification = \"internal\"\nuns_topic_template = \"{uns_template}\"\n\
             [classes.internal]\naction = \"pass\"\n[classes.restricted]\naction = \"never\"\n\
             [egress]\nallow_topic_prefixes = [{egress}]\n"
        );
        let files: Vec<(std::path::PathBuf, String)> = products
            .iter()
            .map(|(id, fields)| {
                let text = format!(
                    "id = \"{id}\"\nname = \"P\"\nversion = \"1.0.0\"\ndomain = \"d\"\nowner = \"o\"\n\
                     [publish]\nuns = true\n{fields}"
                );
                (Path::new(&format!("{id}.toml")).to_path_buf(), text)
            })
            .collect();
        let refs: Vec<(&Path, &str)> = files.iter().map(|(p, t)| (p.as_path(), t.as_str())).collect();
        let gateway = format!("{GATEWAY}[[devices.tags]]\nname = \"code\"\ntable = \"holding\"\naddress = 1\n");
        load_texts(
            (Path::new("agent.toml"), &gateway),
            Some((Path::new("governance.toml"), &governance)),
            &refs,
            Path::new("/nonexistent"),
        )
        .map_err(|e| e.to_string())
    }

    fn field(name: &str, class: &str) -> String {
        let tag = if class == "restricted" { "code" } else { "temp" };
        format!("[[fields]]\nname = \"{name}\"\nsource = \"plc.{tag}\"\nclassification = \"{class}\"\n")
    }

    /// The governance file places the UNS view: every product's fields under its template, and
    /// every catalogue document naming that template.
    #[test]
    fn the_uns_template_places_every_field() {
        let plan = load_uns(
            "{site}/uns/{area}/{line}/{product}/{field}",
            "\"#\"",
            &[("press", &field("temp", "internal"))],
        )
        .unwrap();
        let p = &plan.products[0];
        assert_eq!(p.topic, "s/a/l/d/press/v1");
        assert_eq!(p.uns_topic, "s/uns/a/l/press/{field}");
        assert_eq!(
            crate::publish::uns::field_topic(&p.uns_topic, "temp"),
            "s/uns/a/l/press/temp"
        );
        let d: serde_json::Value = serde_json::from_slice(&crate::publish::envelope::descriptor(&plan, p)).unwrap();
        assert_eq!(d["binding"]["uns_topic"], "s/uns/a/l/press/{field}", "{d}");
        // `{topic}` is the product's topic.
        let plan = load_uns("{topic}/uns/{field}", "\"#\"", &[("press", &field("temp", "internal"))]).unwrap();
        assert_eq!(plan.products[0].uns_topic, "s/a/l/d/press/v1/uns/{field}");
    }

    #[test]
    fn a_uns_template_that_would_merge_topics_is_refused() {
        let one = [("press", field("temp", "internal"))];
        let one: Vec<(&str, &str)> = one.iter().map(|(a, b)| (*a, b.as_str())).collect();
        for (template, says) in [
            (
                "{site}/uns/{product}",
                "must contain `{field}`, or fields would share a topic",
            ),
            (
                "{site}/uns/{field}",
                "must contain `{product}` or `{topic}`, or products would share a topic",
            ),
            ("{site}/{prodcut}/{field}", "unknown placeholder `{prodcut}`"),
            ("{site}/+/{product}/{field}", "MQTT wildcards"),
        ] {
            let err = load_uns(template, "\"#\"", &one).unwrap_err();
            assert!(
                err.contains(says) && err.contains("uns_topic_template"),
                "{template}: {err}"
            );
        }
    }

    /// A UNS topic is a topic leaving the site like any other: outside egress it is refused at
    /// the field (a withheld field has no topic, so nothing to refuse), and it may not land on a
    /// topic another product or field already uses.
    #[test]
    fn a_uns_topic_is_checked_like_a_product_topic() {
        let fields = format!("{}{}", field("temp", "internal"), field("secret", "restricted"));
        let err = load_uns("uns/{product}/{field}", "\"s/\"", &[("press", &fields)]).unwrap_err();
        assert!(
            err.contains("the UNS topic `uns/press/temp` of field `temp` is outside the egress allow-list"),
            "{err}"
        );
        assert!(!err.contains("secret"), "a withheld field has no topic: {err}");
        assert!(err.contains("fields[0].name"), "{err}");
        // Under this template, field `v1` of `press` lands on the product's own message topic.
        let err = load_uns(
            "{site}/{area}/{line}/d/{product}/{field}",
            "\"#\"",
            &[("press", &field("v1", "internal"))],
        )
        .unwrap_err();
        assert!(
            err.contains("the UNS topic `s/a/l/d/press/v1` of field `v1` is already a topic of product `press`"),
            "{err}"
        );
    }
}
