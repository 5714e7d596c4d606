//! The `kind` and `decision` columns as producers name them: enums, turned into the columns'
//! text (exactly the strings of ARCHIVE.md) only when a [`super::RecordInput`] is filled in.

/// What a record is about: its `kind` column, as producers name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Request,
    Response,
    Notification,
    /// A JSON-RPC error, or Airlock's own refusal or failure.
    Error,
    /// A connection's opening, end or refusal, or an egress proxy's request.
    Connection,
    /// An HTTP exchange that carried no MCP message.
    Http,
    /// A human's decision on a held call.
    Approval,
}

impl RecordKind {
    /// The text of the `kind` column.
    pub const fn as_str(self) -> &'static str {
        match self {
            RecordKind::Request => "request",
            RecordKind::Response => "response",
            RecordKind::Notification => "notification",
            RecordKind::Error => "error",
            RecordKind::Connection => "connection",
            RecordKind::Http => "http",
            RecordKind::Approval => "approval",
        }
    }
}

impl From<RecordKind> for String {
    fn from(kind: RecordKind) -> String {
        kind.as_str().to_owned()
    }
}

/// What Airlock did with what a record is about: its `decision` column, as producers name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordDecision {
    Allow,
    Mask,
    Block,
    Approved,
    Denied,
}

impl RecordDecision {
    /// The text of the `decision` column.
    pub const fn as_str(self) -> &'static str {
        match self {
            RecordDecision::Allow => "allow",
            RecordDecision::Mask => "mask",
            RecordDecision::Block => "block",
            RecordDecision::Approved => "approved",
            RecordDecision::Denied => "denied",
        }
    }
}

impl From<RecordDecision> for String {
    fn from(decision: RecordDecision) -> String {
        decision.as_str().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_columns_text_is_the_documented_one() {
        use RecordKind as K;
        let kinds = [
            K::Request,
            K::Response,
            K::Notification,
            K::Error,
            K::Connection,
            K::Http,
            K::Approval,
        ]
        .map(RecordKind::as_str);
        assert_eq!(
            kinds,
            [
                "request",
                "response",
                "notification",
                "error",
                "connection",
                "http",
                "approval"
            ]
        );
        use RecordDecision as D;
        let decisions = [D::Allow, D::Mask, D::Block, D::Approved, D::Denied].map(D::as_str);
        assert_eq!(decisions, ["allow", "mask", "block", "approved", "denied"]);
        assert_eq!(String::from(D::Block), "block");
    }
}
