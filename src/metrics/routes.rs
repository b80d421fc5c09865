//! Which route template a request matched, found before the request reaches axum's router and
//! without its `MatchedPath`.
//!
//! # Why not `MatchedPath`
//!
//! axum tells a request's route template only through the `MatchedPath` extension (its
//! `matched-path` feature), which it inserts into every request's extensions: a SipHash lookup
//! of the route's id, a boxed value and a map insertion, about 800 instructions per request
//! whether or not anyone reads it; and reading it after routing takes a layer on every route
//! (`route_layer`), one more boxed service cloned per request, about 900 more. Together they
//! were most of what counting cost a `/live` request (+15 %, see BENCHMARKS.md).
//!
//! Instead, [`RouteLabels`] is built once per worker from the finished router: its templates,
//! in a `matchit` router of their own (the matcher axum uses, at the version axum pins, so a
//! path matches here exactly when it matches there). A request's path is looked up once, in the
//! guard, before it goes to axum: no allocation, and each template's index in the shared table
//! is found on its first request and kept.
//!
//! # Where the templates come from
//!
//! axum has no API that lists a router's routes; its `Debug` output does, as the field
//! `paths` of the path router's node (`RouteId(1): "/live"`), and that is what [`templates`]
//! reads, once. The unit tests below pin the format on routes of every kind (plain, with
//! parameters, with wildcards, nested, merged, `route_service`, a fallback), so an axum upgrade
//! that changes it fails the test suite rather than the labels; and a router with routes from
//! which no template could be read is logged as a warning, its requests then counted as
//! `unmatched`.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;

use super::table::{OTHER_INDEX, UNMATCHED_INDEX};

/// The parameter axum gives the tail of a nested service (`nest_service`); shown as `rest`.
const NEST_TAIL: &str = "{*__private__axum_nest_tail_param}";

/// Not yet looked up in the shared table.
const UNKNOWN: usize = usize::MAX;

/// The route templates of one router, matched against request paths.
pub struct RouteLabels {
    matcher: matchit::Router<usize>,
    /// Per template: the label, and its index in this worker's block once known.
    routes: Vec<(String, AtomicUsize)>,
}

impl RouteLabels {
    /// The templates of `router` (see the module documentation).
    pub fn of(router: &Router) -> RouteLabels {
        let found = templates(&format!("{router:?}"));
        let mut labels = RouteLabels { matcher: matchit::Router::new(), routes: Vec::new() };
        for template in found.unwrap_or_default() {
            match labels.matcher.insert(template.as_str(), labels.routes.len()) {
                Ok(()) => labels.routes.push((label(&template), AtomicUsize::new(UNKNOWN))),
                Err(e) => tracing::debug!("route template {template:?} not counted apart: {e}"),
            }
        }
        if labels.routes.is_empty() && router.has_routes() {
            tracing::warn!(
                "cannot read this axum version's route templates: requests are counted as route \"unmatched\""
            );
        }
        labels
    }

    /// The index in this worker's block of the route `path` matches: [`UNMATCHED_INDEX`] for
    /// none, [`OTHER_INDEX`] past the block's routes.
    pub fn index(&self, path: &str) -> usize {
        let Ok(found) = self.matcher.at(path) else { return UNMATCHED_INDEX };
        let Some((label, index)) = self.routes.get(*found.value) else { return UNMATCHED_INDEX };
        match index.load(Ordering::Relaxed) {
            UNKNOWN => {
                let known = super::block().map_or(UNMATCHED_INDEX, |b| b.route_index(label).unwrap_or(OTHER_INDEX));
                index.store(known, Ordering::Relaxed);
                known
            }
            known => known,
        }
    }

    /// The labels, in the order the router listed them (for tests).
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|(label, _)| label.as_str())
    }
}

/// A template as shown: a nested service's tail as `{*rest}`.
fn label(template: &str) -> String {
    template.replace(NEST_TAIL, "{*rest}")
}

/// The route templates in a router's `Debug` output: the entries of the first `paths` map (the
/// path router's; the fallback router's comes after it). `None` when the format is not the one
/// known.
fn templates(debug: &str) -> Option<Vec<String>> {
    const MAP: &str = "paths: {";
    let mut rest = &debug[debug.find(MAP)? + MAP.len()..];
    let mut found = Vec::new();
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if rest.starts_with('}') {
            return Some(found);
        }
        rest = rest.strip_prefix("RouteId(")?;
        rest = rest.trim_start_matches(|c: char| c.is_ascii_digit()).strip_prefix("): \"")?;
        let (template, after) = debug_string(rest)?;
        found.push(template);
        rest = after;
    }
}

/// A string as `Debug` writes it, from after its opening quote: the text and what follows
/// the closing quote.
fn debug_string(from: &str) -> Option<(String, &str)> {
    let mut text = String::new();
    let mut chars = from.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return Some((text, &from[at + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => text.push('\n'),
                'r' => text.push('\r'),
                't' => text.push('\t'),
                '0' => text.push('\0'),
                'u' => {
                    let hex: String = chars.by_ref().map(|(_, c)| c).skip(1).take_while(|&c| c != '}').collect();
                    text.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => text.push(other),
            },
            c => text.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{any_service, get, post};

    fn labels(router: &Router) -> Vec<String> {
        let mut labels: Vec<String> = RouteLabels::of(router).labels().map(String::from).collect();
        labels.sort();
        labels
    }

    #[test]
    fn every_kind_of_route_is_read_from_the_router() {
        let nested = Router::new().route("/items/{id}", get(|| async { "" }));
        let service = any_service(tower::service_fn(|_| async { Ok::<_, std::convert::Infallible>("") }));
        let router = Router::new()
            .route("/live", get(|| async { "" }))
            .route("/cache/{key}", get(|| async { "" }).put(|| async { "" }))
            .route("/files/{*path}", get(|| async { "" }))
            .route("/quote\"d/é", post(|| async { "" }))
            .nest("/api", nested)
            .merge(Router::new().route("/merged", get(|| async { "" })))
            .route_service("/svc", service)
            .fallback(|| async { "fallback" });
        assert_eq!(
            labels(&router),
            ["/api/items/{id}", "/cache/{key}", "/files/{*path}", "/live", "/merged", "/quote\"d/é", "/svc"]
        );
    }

    #[test]
    fn a_nested_services_tail_is_shown_as_rest() {
        let service = tower::service_fn(|_| async { Ok::<_, std::convert::Infallible>("") });
        let router = Router::new().nest_service("/assets", service);
        assert!(labels(&router).contains(&"/assets/{*rest}".to_string()), "{:?}", labels(&router));
    }

    #[test]
    fn paths_match_as_axum_matches_them() {
        let router = Router::new()
            .route("/live", get(|| async { "" }))
            .route("/cache/{key}", get(|| async { "" }))
            .route("/files/{*path}", get(|| async { "" }));
        let labels = RouteLabels::of(&router);
        let named = |path: &str| labels.matcher.at(path).ok().map(|m| labels.routes[*m.value].0.clone());
        assert_eq!(named("/live").as_deref(), Some("/live"));
        assert_eq!(named("/cache/k1").as_deref(), Some("/cache/{key}"));
        assert_eq!(named("/files/a/b/c").as_deref(), Some("/files/{*path}"));
        assert_eq!(named("/live/"), None, "no trailing-slash redirect, as in axum");
        assert_eq!(named("/cache/"), None);
        assert_eq!(named("/nothing"), None);
        // Without a table in this process every request is `unmatched`.
        assert_eq!(labels.index("/live"), UNMATCHED_INDEX);
    }

    #[test]
    fn an_empty_router_has_no_templates() {
        assert!(labels(&Router::new()).is_empty());
        assert_eq!(templates("something else entirely"), None);
    }

    #[test]
    fn debug_strings_are_read_back() {
        assert_eq!(debug_string(r#"a\"b\\c\u{7f}d" rest"#), Some(("a\"b\\c\u{7f}d".to_string(), " rest")));
        assert_eq!(debug_string("unterminated"), None);
    }
}
