//! Every reply the registration bot sends, in one place (plain text; no parse mode).

/// The label of the contact-sharing button (`KeyboardButton.request_contact`).
pub const SHARE_PHONE_BUTTON: &str = "Share my phone number";

/// `/start` from someone who is not registered yet.
pub const START_UNREGISTERED: &str = "Hello! This bot sends you Superset reports. To find out which ones, it needs your phone number as your administrator entered it: tap “Share my phone number” below.";

/// `/help`.
pub const HELP: &str = "This bot forwards Superset reports to Telegram.\n\n\
People: send /start in a private chat with the bot and tap “Share my phone number”. If your number is on your administrator's list, you start receiving the reports of your mailboxes at once. /start shows what you receive.\n\n\
Groups: add the bot to the group and make it an administrator. The group's title must match a group name your administrator configured; the group then receives that group's reports.\n\n\
/reports lists what you receive. /mute <address> pauses one mailbox for you; /unmute resumes it.";

/// Header of the list of mailboxes a person or group receives; one `• name` line follows per
/// mailbox.
pub const YOU_RECEIVE: &str = "You receive reports from:";

/// Sent after a successful registration, before the list.
pub const REGISTERED: &str = "Done, you are registered.";

/// A registered person or group bound to no mailbox yet.
pub const NO_MAILBOXES: &str = "You are registered, but no reports are assigned to you yet. Ask your administrator to add them.";

/// A contact that is not the sender's own, or a forwarded one.
pub const NOT_YOUR_CONTACT: &str = "Please share your own phone number with the button below. Other people's contact cards are not accepted.";

/// A contact sent outside a private chat.
pub const PRIVATE_ONLY: &str = "Registration works only in a private chat with the bot.";

/// A phone number that matches no person.
pub const NOT_ON_LIST: &str =
    "This number is not on the list. Please ask your administrator to add it, then share it again.";

/// SeaTable could not be read or written.
pub const TRY_LATER: &str =
    "Sorry, registration is not available right now. Please try again in a few minutes.";

/// The bot was added to a group as a plain member.
pub const ADDED_AS_MEMBER: &str = "Thanks for adding me. Registration completes when an administrator of this group makes me an administrator.";

/// The group's (normalised) title is the `Name` of no group row.
pub fn group_not_configured(title: &str) -> String {
    format!(
        "No group named “{title}” is configured. Ask your administrator to add it, then make me an administrator again."
    )
}

/// Two or more group rows have this name.
pub fn group_ambiguous(title: &str) -> String {
    format!(
        "Several groups are named “{title}”, so I cannot tell which one this is. Ask your administrator to make the names unique."
    )
}

/// The row with this name is bound to another chat, or locked.
pub fn group_taken(title: &str) -> String {
    format!("The name “{title}” is already registered to another group.")
}

/// A group registered (or already registered) to its row.
pub fn group_registered(title: &str) -> String {
    format!("This group is registered as “{title}”.")
}

/// The `• name` list of mailboxes after [`YOU_RECEIVE`], or [`NO_MAILBOXES`].
pub fn mailbox_list(names: &[String]) -> String {
    if names.is_empty() {
        return NO_MAILBOXES.to_owned();
    }
    let mut text = YOU_RECEIVE.to_owned();
    for name in names {
        text.push_str("\n• ");
        text.push_str(name);
    }
    text
}

/// `/mute` or `/unmute` in a group.
pub const MUTE_PRIVATE_ONLY: &str = "Only a person can pause reports, for themselves, in a private chat with the bot. What a group receives is set by your administrator.";

/// One mailbox in the `/reports` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportLine {
    /// Its display name.
    pub name: String,
    /// Its address, which `/mute` and `/unmute` take.
    pub address: String,
    /// Whether the person paused it with `/mute`.
    pub paused: bool,
}

/// `/reports`: each mailbox the chat receives, or [`NO_MAILBOXES`], and the chat's title
/// filters (`reports_filter`) as written.
pub fn reports(lines: &[ReportLine], filters: &[String]) -> String {
    if lines.is_empty() {
        return NO_MAILBOXES.to_owned();
    }
    let mut text = YOU_RECEIVE.to_owned();
    for line in lines {
        text.push_str(&format!("\n• {} ({})", line.name, line.address));
        if line.paused {
            text.push_str(" (paused)");
        }
    }
    for filter in filters {
        text.push_str(&format!("\nOnly reports whose title matches: {filter}"));
    }
    if lines.iter().any(|l| l.paused) {
        text.push_str("\n\n/unmute resumes the paused ones.");
    } else {
        text.push_str("\n\n/mute <address> pauses one for you.");
    }
    text
}

/// `/mute` of a mailbox the person does not receive.
pub fn not_received(wanted: &str) -> String {
    if wanted.is_empty() {
        return "Which reports? Send /mute followed by an address from /reports.".to_owned();
    }
    format!("You do not receive “{wanted}”. /reports lists what you receive.")
}

/// `/mute` done.
pub fn muted(name: &str, address: &str) -> String {
    format!("Paused “{name}” for you. /unmute {address} resumes it.")
}

/// `/unmute` of one mailbox.
pub fn unmuted(address: &str, was_paused: bool) -> String {
    if was_paused {
        format!("Resumed {address}: its next reports come to you again.")
    } else {
        format!("{address} was not paused.")
    }
}

/// `/unmute` without an argument.
pub fn unmuted_all(resumed: u64) -> String {
    match resumed {
        0 => "Nothing was paused.".to_owned(),
        1 => "Resumed the paused mailbox.".to_owned(),
        n => format!("Resumed {n} paused mailboxes."),
    }
}
