//! The registration bot, black box: `report-relay run` against a real Dovecot and the fake
//! SeaTable and Telegram servers. Updates go in through the fake Bot API; what comes out is the
//! bot's replies, the SeaTable rows and the relayed reports.
//!
//! Most tests are one row of a table: a [`Case`] names the rows in the base, the Telegram
//! update, the bot's expected reply and the cells the update writes (nothing else in `users`
//! and `t_chats` may change), and [`check`] plays it. Tests with more to say play it with
//! [`Case::run`] and go on from the [`Session`] it returns.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::ops::Deref;
use std::time::Duration;

use report_relay::bot::texts;
use serde_json::{Map, Value, json};
use support::seatable::FakeSeaTable;
use support::stack::{InProcess, Stack, Tuning, fixture};
use support::telegram::{Call, ChatState, ContactCard, TgChat, TgUser};

/// Every wait. Deliberately shorter than the default `cache_ttl_secs` (60 s): a registration
/// must reach deliveries by refreshing the directory, not by the cache expiring.
const WAIT: Duration = Duration::from_secs(30);

const ANN: i64 = 111_222_333;
const BOB: i64 = 222_333_444;
const CAROL: i64 = 333_444_555;
/// Somebody else whose contact card Ann might share.
const OTHER: i64 = 444_555_666;
/// The group administrator who adds and promotes the bot.
const ADMIN: i64 = 555_666_777;
const BASIC: i64 = -987_654_321;
const SUPER: i64 = -1_001_987_654_321;
const OTHER_SUPER: i64 = -1_001_555_666_777;

/// Ann's number as the administrator typed it, and as Telegram sends it.
const ANN_PHONE_TYPED: &str = "+7 (999) 123-45-67";
const ANN_PHONE_TG: &str = "79991234567";

/// `Name` of the stack's default mailbox row, and its `description`.
const REPORTS: &str = "reports";
const SALES: &str = "Sales reports";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn ann() -> TgUser {
    TgUser::new(ANN, "Ann")
}

fn bob() -> TgUser {
    TgUser::new(BOB, "Bob")
}

fn admin() -> TgUser {
    TgUser::new(ADMIN, "Olga").with_username("olga_admin")
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The reply to an accepted contact.
fn registered_reply(mailboxes: &[&str]) -> String {
    format!(
        "{}\n\n{}",
        texts::REGISTERED,
        texts::mailbox_list(&names(mailboxes))
    )
}

/// The reply to a successful (or repeated) group registration.
fn group_registered_reply(title: &str, mailboxes: &[&str]) -> String {
    format!(
        "{}\n\n{}",
        texts::group_registered(title),
        texts::mailbox_list(&names(mailboxes))
    )
}

fn contact_keyboard() -> Value {
    json!({"keyboard": [[{"text": "Share my phone number", "request_contact": true}]],
           "one_time_keyboard": true, "resize_keyboard": true})
}

/// The cells of a users row that registration has given `id_telegram`.
fn registered_person(name: &str, phone: &str, telegram_id: i64) -> Value {
    json!({"Name": name, "phone": phone, "id_telegram": telegram_id.to_string()})
}

/// The cells of a t_chats row bound and locked to `chat_id`.
fn bound_group(name: &str, chat_id: i64) -> Value {
    json!({"Name": name, "id_telegram_chat": chat_id.to_string(), "is_locked": true})
}

/// A users row with this phone (as the administrator typed it) and `id_telegram`.
fn add_person(
    stack: &Stack,
    name: &str,
    phone: &str,
    telegram_id: Option<i64>,
    mailboxes: &[String],
) -> String {
    let row = stack.seatable.add_row(
        "users",
        json!({"Name": name, "phone": phone,
               "id_telegram": telegram_id.map(|id| id.to_string())}),
    );
    link(stack, "users", &row, mailboxes);
    row
}

/// A t_chats row with exactly these cells.
fn add_group_row(
    stack: &Stack,
    name: &str,
    chat_id: Option<i64>,
    locked: bool,
    mailboxes: &[String],
) -> String {
    let row = stack.seatable.add_row(
        "t_chats",
        json!({"Name": name, "id_telegram_chat": chat_id.map(|id| id.to_string()),
               "is_locked": locked}),
    );
    link(stack, "t_chats", &row, mailboxes);
    row
}

/// Links a users or t_chats row to these mailbox rows.
fn link(stack: &Stack, table: &str, row: &str, mailboxes: &[String]) {
    let mailboxes: Vec<&str> = mailboxes.iter().map(String::as_str).collect();
    stack.seatable.link(table, "mailboxes", row, &mailboxes);
}

/// One more mailbox row, with its own Dovecot account (so the relay can watch it and become
/// ready). An empty description is stored as an empty cell.
fn add_mailbox(stack: &Stack, name: &str, description: &str) -> String {
    let address = format!("{}@test.local", name.to_lowercase());
    stack.dovecot.add_user(&address, "box-secret").unwrap();
    stack.seatable.add_row(
        "mailboxes",
        json!({"Name": name, "email": address, "description": description,
               "imap_password": "box-secret"}),
    )
}

/// The user-visible cells of a row (system fields `_id`, `_mtime`, … left out).
fn cells(stack: &Stack, table: &str, row: &str) -> Map<String, Value> {
    let row = stack
        .seatable
        .row(table, row)
        .unwrap_or_else(|| panic!("{table} has no row {row}"));
    visible(row)
}

fn visible(row: Map<String, Value>) -> Map<String, Value> {
    row.into_iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .collect()
}

/// The user-visible cells of every users and t_chats row but the rows `except` (by `_id`).
fn snapshot(stack: &Stack, except: &[&str]) -> Vec<Vec<Map<String, Value>>> {
    ["users", "t_chats"]
        .into_iter()
        .map(|table| {
            stack
                .seatable
                .rows(table)
                .into_iter()
                .filter(|row| !except.iter().any(|id| row["_id"] == *id))
                .map(visible)
                .collect()
        })
        .collect()
}

/// Waits until every key of `expected` has that value in the row; panics with the row.
async fn expect_cells(stack: &Stack, table: &str, row: &str, expected: &Value) {
    let expected = expected.as_object().unwrap().clone();
    let matches = |s: &FakeSeaTable| {
        s.row(table, row)
            .is_some_and(|r| expected.iter().all(|(k, v)| r.get(k) == Some(v)))
    };
    if tokio::time::timeout(WAIT, stack.seatable.wait_until(matches))
        .await
        .is_err()
    {
        panic!(
            "{table} row {row} never became {expected:?}; it is {:?}",
            cells(stack, table, row)
        );
    }
}

/// The highest call sequence number so far: calls after it are later than anything seen.
fn mark(stack: &Stack) -> u64 {
    stack
        .telegram
        .calls()
        .iter()
        .map(|c| c.seq)
        .max()
        .unwrap_or(0)
}

fn is_reply_after(call: &Call, chat: i64, after: u64) -> bool {
    call.seq > after && call.method == "sendMessage" && call.chat_id == Some(chat) && call.is_ok()
}

/// The first successful `sendMessage` to `chat` after `after`.
async fn reply_after(stack: &Stack, chat: i64, after: u64) -> Call {
    let calls = stack
        .telegram
        .wait_for(
            |calls| calls.iter().any(|c| is_reply_after(c, chat, after)),
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("no reply in chat {chat}: {e}"));
    calls
        .into_iter()
        .find(|c| is_reply_after(c, chat, after))
        .unwrap()
}

/// Successful `sendMessage` calls to `chat` after `after`.
fn replies_after(stack: &Stack, chat: i64, after: u64) -> Vec<Call> {
    stack
        .telegram
        .calls()
        .into_iter()
        .filter(|c| is_reply_after(c, chat, after))
        .collect()
}

/// Any call carrying `chat` as its chat_id after `after` (whatever the method or outcome).
fn calls_to_after(stack: &Stack, chat: i64, after: u64) -> Vec<Call> {
    stack
        .telegram
        .calls()
        .into_iter()
        .filter(|c| c.seq > after && c.chat_id == Some(chat))
        .collect()
}

/// `#seq method -> outcome` for each call, for failure messages (a Call's Debug holds the
/// uploaded bytes).
fn summary(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .map(|c| {
            let outcome = if c.is_ok() {
                "ok".to_owned()
            } else {
                format!("{:?} {:?}", c.error_code(), c.error_description())
            };
            format!("#{} {} text={:?} -> {outcome}", c.seq, c.method, c.text)
        })
        .collect()
}

/// Report sends (message-producing calls other than the bot's text replies) to `chat`, any
/// outcome. The fixtures used here are a photo and a PDF, never a text message.
fn report_calls(stack: &Stack, chat: i64) -> Vec<Call> {
    stack
        .telegram
        .calls()
        .into_iter()
        .filter(|c| c.is_send() && c.method != "sendMessage" && c.chat_id == Some(chat))
        .collect()
}

/// Waits until each chat has had at least `n` successful report sends.
async fn wait_reports(stack: &Stack, chats: &[i64], n: usize) {
    let chats = chats.to_vec();
    stack
        .telegram
        .wait_for(
            move |calls| {
                chats.iter().all(|chat| {
                    calls
                        .iter()
                        .filter(|c| {
                            c.is_send()
                                && c.is_ok()
                                && c.method != "sendMessage"
                                && c.chat_id == Some(*chat)
                        })
                        .count()
                        >= n
                })
            },
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("reports did not arrive: {e}"));
}

async fn confirmed(stack: &Stack, update_id: i64) {
    stack
        .telegram
        .wait_update_confirmed(update_id, WAIT)
        .await
        .unwrap_or_else(|e| panic!("the bot did not confirm update {update_id}: {e}"));
}

// ---------------------------------------------------------------------------------------------
// The table: rows in the base, an update, the reply, what it writes
// ---------------------------------------------------------------------------------------------

/// A row seeded before the relay starts. Rows link to mailboxes by `Name`: [`REPORTS`] (the
/// default) or a [`Row::Mailbox`] of the same case.
enum Row {
    /// One more mailbox row, with its own Dovecot account ([`add_mailbox`]).
    Mailbox {
        name: &'static str,
        description: &'static str,
    },
    /// A users row ([`add_person`]).
    Person {
        name: String,
        phone: String,
        telegram_id: Option<i64>,
        mailboxes: Vec<&'static str>,
    },
    /// A t_chats row ([`add_group_row`]).
    Group {
        name: &'static str,
        chat_id: Option<i64>,
        locked: bool,
        mailboxes: Vec<&'static str>,
    },
}

fn mailbox(name: &'static str, description: &'static str) -> Row {
    Row::Mailbox { name, description }
}

/// A users row linked to the default mailbox, with the phone as the administrator typed it.
fn person(name: &str, phone: &str, telegram_id: Option<i64>) -> Row {
    Row::Person {
        name: name.to_owned(),
        phone: phone.to_owned(),
        telegram_id,
        mailboxes: vec![REPORTS],
    }
}

/// A t_chats row linked to the default mailbox.
fn group(name: &'static str, chat_id: Option<i64>, locked: bool) -> Row {
    Row::Group {
        name,
        chat_id,
        locked,
        mailboxes: vec![REPORTS],
    }
}

impl Row {
    /// The row linked to these mailboxes instead (links are in no particular order).
    fn linked(mut self, to: &[&'static str]) -> Self {
        match &mut self {
            Row::Person { mailboxes, .. } | Row::Group { mailboxes, .. } => {
                *mailboxes = to.to_vec()
            }
            Row::Mailbox { .. } => panic!("a mailbox row links to nothing"),
        }
        self
    }
}

/// A Telegram update and the chat the bot answers it in.
enum Event {
    /// `/start` in the user's private chat.
    Start(TgUser),
    /// A command in the user's private chat.
    Command(TgUser, &'static str),
    /// The user shares a contact card in the private chat.
    Contact(TgUser, Box<ContactCard>),
    /// [`admin`] adds the bot to the chat as a plain member.
    Added(TgChat),
    /// [`admin`] promotes the bot to administrator.
    Promoted(TgChat),
    /// [`admin`] adds the bot as administrator right away.
    AddedAsAdmin(TgChat),
}

/// The user shares their own contact card with this number.
fn contact(user: TgUser, phone: &str) -> Event {
    let card = ContactCard::own(&user, phone);
    Event::Contact(user, Box::new(card))
}

impl Event {
    /// The chat the reply goes to.
    fn chat(&self) -> i64 {
        match self {
            Event::Start(user) | Event::Command(user, _) | Event::Contact(user, _) => user.id,
            Event::Added(chat) | Event::Promoted(chat) | Event::AddedAsAdmin(chat) => chat.id,
        }
    }

    /// Pushes the update; returns its update_id.
    fn push(&self, stack: &Stack) -> i64 {
        let telegram = &stack.telegram;
        match self {
            Event::Start(user) => telegram.push_start(user),
            Event::Command(user, command) => {
                telegram.push_command(&TgChat::private(user), user, command)
            }
            Event::Contact(user, card) => telegram.push_contact(user, (**card).clone()),
            Event::Added(chat) => telegram.push_bot_added(chat, &admin()),
            Event::Promoted(chat) => telegram.push_bot_promoted(chat, &admin()),
            Event::AddedAsAdmin(chat) => telegram.push_bot_added_as_admin(chat, &admin()),
        }
    }
}

/// The bot's expected reply: its text and, where a case says so, its `reply_markup`.
struct Reply {
    text: String,
    markup: Option<Option<Value>>,
}

/// A reply with this text (whatever its markup).
fn says(text: impl Into<String>) -> Reply {
    Reply {
        text: text.into(),
        markup: None,
    }
}

impl Reply {
    /// The reply also has exactly this `reply_markup` (`None`: none at all).
    fn with_markup(self, markup: Option<Value>) -> Self {
        Self {
            markup: Some(markup),
            ..self
        }
    }

    fn check(&self, call: &Call) {
        assert_eq!(call.text.as_deref(), Some(self.text.as_str()));
        if let Some(markup) = &self.markup {
            assert_eq!(&call.reply_markup, markup);
        }
    }
}

/// The answer to an accepted contact: the mailbox list, and the contact keyboard removed.
fn registered(mailboxes: &[&str]) -> Reply {
    says(registered_reply(mailboxes)).with_markup(Some(json!({"remove_keyboard": true})))
}

/// The answer to a registered person's `/start`: their mailboxes, no keyboard.
fn listing(mailboxes: &[&str]) -> Reply {
    says(texts::mailbox_list(&names(mailboxes))).with_markup(None)
}

fn group_registered(title: &str, mailboxes: &[&str]) -> Reply {
    says(group_registered_reply(title, mailboxes))
}

/// One exchange with the bot.
struct Case {
    /// The base before the relay starts (besides the default mailbox).
    rows: Vec<Row>,
    event: Event,
    reply: Reply,
    /// The cells the update writes, by the `Name` of a seeded row; every other users and
    /// t_chats row stays as it was. Empty: nothing is written.
    writes: Vec<(&'static str, Value)>,
}

/// Plays a case whose exchange is the whole test.
async fn check(case: Case) {
    case.run().await.stop().await;
}

impl Case {
    async fn run(self) -> Session {
        self.run_with(&Tuning::default()).await
    }

    async fn run_with(self, tuning: &Tuning) -> Session {
        let session = Session::open_with(self.rows, tuning).await;
        session
            .exchange(&self.event, &self.reply, &self.writes)
            .await;
        session
    }
}

/// The stack with its seeded rows, the relay running and ready, the bot's long poll parked.
struct Session {
    stack: Stack,
    relay: InProcess,
    /// Table, `Name` and `_id` of every seeded users and t_chats row.
    seeded: Vec<(&'static str, String, String)>,
}

impl Deref for Session {
    type Target = Stack;

    fn deref(&self) -> &Stack {
        &self.stack
    }
}

impl Session {
    async fn open(rows: Vec<Row>) -> Self {
        Self::open_with(rows, &Tuning::default()).await
    }

    async fn open_with(rows: Vec<Row>, tuning: &Tuning) -> Self {
        let stack = Stack::new().await;
        let mut mailboxes = HashMap::from([(REPORTS, stack.mailbox_row.clone())]);
        for row in &rows {
            if let Row::Mailbox { name, description } = row {
                mailboxes.insert(name, add_mailbox(&stack, name, description));
            }
        }
        let links = |names: &[&str]| -> Vec<String> {
            names.iter().map(|name| mailboxes[name].clone()).collect()
        };
        let mut seeded = Vec::new();
        for row in &rows {
            match row {
                Row::Mailbox { .. } => {}
                Row::Person {
                    name,
                    phone,
                    telegram_id,
                    mailboxes,
                } => {
                    let id = add_person(&stack, name, phone, *telegram_id, &links(mailboxes));
                    seeded.push(("users", name.clone(), id));
                }
                Row::Group {
                    name,
                    chat_id,
                    locked,
                    mailboxes,
                } => {
                    let id = add_group_row(&stack, name, *chat_id, *locked, &links(mailboxes));
                    seeded.push(("t_chats", (*name).to_owned(), id));
                }
            }
        }
        let relay = stack.start(tuning);
        stack.wait_ready(mailboxes.len()).await;
        stack
            .telegram
            .wait_for_long_poll(WAIT)
            .await
            .unwrap_or_else(|e| panic!("the bot never long-polled: {e}"));
        Self {
            stack,
            relay,
            seeded,
        }
    }

    /// The table and `_id` of the seeded row with this `Name`.
    fn row(&self, name: &str) -> (&'static str, &str) {
        let mut found = self.seeded.iter().filter(|(_, n, _)| n == name);
        let (table, _, id) = found
            .next()
            .unwrap_or_else(|| panic!("no seeded row {name:?}"));
        assert!(found.next().is_none(), "two seeded rows {name:?}");
        (table, id)
    }

    /// The user-visible cells of the seeded row with this `Name`.
    fn cells(&self, name: &str) -> Map<String, Value> {
        let (table, id) = self.row(name);
        cells(self, table, id)
    }

    /// Waits until every key of `expected` has that value in the seeded row with this `Name`.
    async fn expect_cells(&self, name: &str, expected: &Value) {
        let (table, id) = self.row(name);
        expect_cells(self, table, id, expected).await;
    }

    /// Pushes `event` and checks the bot's first reply to it against `reply`, then waits for
    /// `writes` and checks that no other users or t_chats row changed. Returns the reply.
    async fn exchange(&self, event: &Event, reply: &Reply, writes: &[(&str, Value)]) -> Call {
        let written: Vec<&str> = writes.iter().map(|(name, _)| self.row(name).1).collect();
        let before = snapshot(self, &written);
        let after = mark(self);
        event.push(self);
        let call = reply_after(self, event.chat(), after).await;
        reply.check(&call);
        for (name, expected) in writes {
            self.expect_cells(name, expected).await;
        }
        assert_eq!(snapshot(self, &written), before, "nothing else is written");
        call
    }

    async fn stop(self) {
        self.relay.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. /start, /help, the command menu
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_an_unknown_person_offers_the_contact_button() {
    check(Case {
        // Carol's row exists but is not registered; nobody has her id.
        rows: vec![person("Carol", "+7 999 555-44-33", None)],
        event: Event::Start(TgUser::new(CAROL, "Carol")),
        reply: says(texts::START_UNREGISTERED).with_markup(Some(contact_keyboard())),
        writes: vec![],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_a_registered_person_lists_their_mailboxes() {
    let session = Case {
        rows: vec![
            mailbox("Marketing", ""),
            mailbox("Finance", "Finance digest"),
            // Ann has two rows (e.g. two departments); Sales is linked to both. Links are in no
            // particular order.
            person("Ann", ANN_PHONE_TYPED, Some(ANN)).linked(&[REPORTS, "Marketing"]),
            person("Ann (finance)", "89991234567", Some(ANN)).linked(&["Finance", REPORTS]),
            // Bob is registered but receives nothing yet.
            person("Bob", "+7 999 765-43-21", Some(BOB)).linked(&[]),
        ],
        event: Event::Start(ann()),
        reply: listing(&["Finance digest", "Marketing", SALES]),
        writes: vec![],
    }
    .run()
    .await;
    let bob_start = says(texts::NO_MAILBOXES).with_markup(None);
    session
        .exchange(&Event::Start(bob()), &bob_start, &[])
        .await;
    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_and_the_command_menu() {
    let session = Session::open(vec![]).await;

    let calls = session
        .telegram
        .wait_for(
            |calls| {
                calls
                    .iter()
                    .any(|c| c.method == "setMyCommands" && c.is_ok())
            },
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("setMyCommands was never called: {e}"));
    let call = calls
        .iter()
        .rfind(|c| c.method == "setMyCommands" && c.is_ok())
        .unwrap();
    let commands: Value = serde_json::from_str(&call.params["commands"]).unwrap();
    let commands: Vec<&str> = commands
        .as_array()
        .unwrap()
        .iter()
        // The server accepts the command with or without its slash (teloxide sends `/start`);
        // the name is what follows it.
        .map(|c| {
            let command = c["command"].as_str().unwrap();
            command.strip_prefix('/').unwrap_or(command)
        })
        .collect();
    assert_eq!(commands.len(), 5, "{commands:?}");
    assert_eq!(
        commands.into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from(["help", "mute", "reports", "start", "unmute"])
    );

    session
        .exchange(&Event::Command(ann(), "/help"), &says(texts::HELP), &[])
        .await;
    session.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Which contacts are accepted
// ---------------------------------------------------------------------------------------------

/// Ann (and Other) on the list, unregistered; `card` is pushed by Ann; the answer must be
/// NOT_YOUR_CONTACT and no row may change.
async fn contact_is_refused(card: ContactCard) {
    check(Case {
        rows: vec![
            person("Ann", ANN_PHONE_TYPED, None),
            person("Other", "+7 999 222-33-44", None),
        ],
        event: Event::Contact(ann(), Box::new(card)),
        reply: says(texts::NOT_YOUR_CONTACT),
        writes: vec![],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_elses_contact_card_is_refused() {
    // The card's number is on the list (Ann's own number, even), but it is Other's card.
    contact_is_refused(ContactCard::other(ANN_PHONE_TG, "Other", Some(OTHER))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_elses_card_with_a_listed_number_is_refused() {
    contact_is_refused(ContactCard::other("79992223344", "Other", Some(OTHER))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_own_contact_is_refused() {
    contact_is_refused(ContactCard::own(&ann(), ANN_PHONE_TG).forwarded_from(&ann())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_forwarded_from_someone_else_is_refused() {
    contact_is_refused(ContactCard::own(&ann(), ANN_PHONE_TG).forwarded_from(&bob())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_without_user_id_is_refused() {
    contact_is_refused(ContactCard::other(ANN_PHONE_TG, "Ann", None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_shared_in_a_group_registers_nobody() {
    let session = Session::open(vec![person("Ann", ANN_PHONE_TYPED, None)]).await;
    let before = snapshot(&session, &[]);

    let group = TgChat::group(BASIC, "Coffee corner");
    let update = session.telegram.push_message(
        &group,
        Some(&ann()),
        json!({"contact": {"phone_number": ANN_PHONE_TG, "first_name": "Ann", "user_id": ANN}}),
    );
    confirmed(&session, update).await;
    // Updates of one chat are handled in order: once the promotion in the same group is
    // answered, the contact has been handled.
    let barrier = mark(&session);
    Event::Promoted(group).push(&session);
    let not_configured = texts::group_not_configured("Coffee corner");
    session
        .telegram
        .wait_for(
            |calls| {
                calls.iter().any(|c| {
                    is_reply_after(c, BASIC, barrier) && c.text.as_deref() == Some(&not_configured)
                })
            },
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("no answer to the promotion: {e}"));
    assert_eq!(snapshot(&session, &[]), before, "nothing is written");
    session.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Phone matching and registration
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_writes_the_id_and_the_next_report_arrives_without_restart() {
    let session = Case {
        rows: vec![
            person("Ann", ANN_PHONE_TYPED, None),
            person("Bob", "+7 999 222-33-44", None),
        ],
        event: contact(ann(), ANN_PHONE_TG),
        reply: registered(&[SALES]),
        writes: vec![("Ann", registered_person("Ann", ANN_PHONE_TYPED, ANN))],
    }
    .run()
    .await;

    // The directory was refreshed: the very next report reaches Ann (cache_ttl_secs is 60,
    // longer than WAIT).
    session.deliver(&fixture("01_chart_png_report.eml")).await;
    wait_reports(&session, &[ANN], 1).await;
    assert_eq!(report_calls(&session, ANN).len(), 1);
    assert_eq!(report_calls(&session, ANN)[0].method, "sendPhoto");

    // And /start now knows her.
    session
        .exchange(&Event::Start(ann()), &listing(&[SALES]), &[])
        .await;
    session.stop().await;
}

/// A label and how to write a 10-digit national number that way.
type PhoneFormat = (&'static str, fn(&str) -> String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phone_format_matches_both_telegram_formats() {
    let typed: [PhoneFormat; 6] = [
        ("+7 (999) 123-45-67", |n| {
            format!("+7 ({}) {}-{}-{}", &n[..3], &n[3..6], &n[6..8], &n[8..])
        }),
        ("8 999 123 45 67", |n| {
            format!("8 {} {} {} {}", &n[..3], &n[3..6], &n[6..8], &n[8..])
        }),
        ("89991234567", |n| format!("8{n}")),
        ("9991234567", |n| n.to_owned()),
        ("+7 999 123-45-67", |n| {
            format!("+7 {} {}-{}-{}", &n[..3], &n[3..6], &n[6..8], &n[8..])
        }),
        ("79991234567", |n| format!("7{n}")),
    ];
    let sent: [PhoneFormat; 2] = [
        ("79991234567", |n| format!("7{n}")),
        ("+79991234567", |n| format!("+7{n}")),
    ];
    struct Pair {
        label: String,
        user: TgUser,
        name: String,
        phone_tg: String,
    }
    let mut rows = Vec::new();
    let mut pairs = Vec::new();
    for (i, (typed_label, typed_fmt)) in typed.iter().enumerate() {
        for (j, (sent_label, sent_fmt)) in sent.iter().enumerate() {
            let k = i * sent.len() + j;
            let national = format!("99912345{k:02}");
            let name = format!("User {k}");
            rows.push(person(&name, &typed_fmt(&national), None));
            pairs.push(Pair {
                label: format!("typed like {typed_label:?}, sent like {sent_label:?}"),
                user: TgUser::new(300_000_100 + k as i64, &name),
                name,
                phone_tg: sent_fmt(&national),
            });
        }
    }
    let session = Session::open(rows).await;

    let before = mark(&session);
    for pair in &pairs {
        session
            .telegram
            .push_contact(&pair.user, ContactCard::own(&pair.user, &pair.phone_tg));
    }
    let expected = registered_reply(&[SALES]);
    let mut failures = Vec::new();
    for pair in &pairs {
        let reply = reply_after(&session, pair.user.id, before).await;
        if reply.text.as_deref() != Some(expected.as_str()) {
            failures.push(format!("{}: replied {:?}", pair.label, reply.text));
            continue;
        }
        let id = session.cells(&pair.name)["id_telegram"].clone();
        if id != json!(pair.user.id.to_string()) {
            failures.push(format!("{}: id_telegram is {id}", pair.label));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_national_number_takes_the_configured_country_code() {
    let us = Tuning {
        default_country_code: Some("1"),
        ..Tuning::default()
    };
    Case {
        rows: vec![person("Ann", "(202) 555-0143", None)],
        event: contact(ann(), "12025550143"),
        reply: registered(&[SALES]),
        writes: vec![(
            "Ann",
            json!({"phone": "(202) 555-0143", "id_telegram": ANN.to_string()}),
        )],
    }
    .run_with(&us)
    .await
    .stop()
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_not_on_the_list_is_refused_and_nothing_is_written() {
    let session = Case {
        rows: vec![
            person("Ann", ANN_PHONE_TYPED, None),
            person("Dan", "8 999 111 22 33", None),
        ],
        // One digit off Ann's number.
        event: contact(ann(), "79991234568"),
        reply: says(texts::NOT_ON_LIST),
        writes: vec![],
    }
    .run()
    .await;
    // Dan's national number under another country code is another number.
    let not_on_list = says(texts::NOT_ON_LIST);
    session
        .exchange(&contact(bob(), "+19991112233"), &not_on_list, &[])
        .await;
    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_numbers_never_match_a_russian_row_through_national_rules() {
    // Telegram sends +47 41 23 45 67 (Norway) as 4741234567 and +84 91 234 56 78 (Vietnam) as
    // 84912345678; read with the SeaTable rules for national numbers they would be
    // +7 474 123-45-67 and +7 491 234-56-78, other people's rows. The Norwegian number
    // registers only its own row; the Vietnamese one, without a row, nobody.
    let session = Case {
        rows: vec![
            person("Ivan", "+7 474 123-45-67", None),
            person("Dan", "8 491 234 56 78", None),
            person("Ola", "+47 41 23 45 67", None),
        ],
        event: contact(ann(), "4741234567"),
        reply: registered(&[SALES]),
        writes: vec![("Ola", registered_person("Ola", "+47 41 23 45 67", ANN))],
    }
    .run()
    .await;
    let not_on_list = says(texts::NOT_ON_LIST);
    session
        .exchange(&contact(bob(), "84912345678"), &not_on_list, &[])
        .await;
    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rows_with_the_same_number_both_get_the_id() {
    check(Case {
        rows: vec![
            mailbox("Marketing", ""),
            person("Ann", ANN_PHONE_TYPED, None),
            person("Ann (marketing)", "89991234567", None).linked(&["Marketing", REPORTS]),
            person("Bob", "+7 999 222-33-44", None),
        ],
        event: contact(ann(), "+79991234567"),
        reply: registered(&["Marketing", SALES]),
        writes: vec![
            ("Ann", registered_person("Ann", ANN_PHONE_TYPED, ANN)),
            (
                "Ann (marketing)",
                registered_person("Ann (marketing)", "89991234567", ANN),
            ),
        ],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_again_with_the_same_id_answers_the_same() {
    let session = Session::open(vec![person("Ann", ANN_PHONE_TYPED, Some(ANN))]).await;
    for _ in 0..2 {
        session
            .exchange(&contact(ann(), ANN_PHONE_TG), &registered(&[SALES]), &[])
            .await;
    }
    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_account_overwrites_the_old_id() {
    const OLD_ACCOUNT: i64 = 999_888_777;
    check(Case {
        rows: vec![person("Ann", ANN_PHONE_TYPED, Some(OLD_ACCOUNT))],
        event: contact(ann(), ANN_PHONE_TG),
        reply: registered(&[SALES]),
        writes: vec![("Ann", registered_person("Ann", ANN_PHONE_TYPED, ANN))],
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. A person who blocks the bot
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_who_blocked_the_bot_is_skipped_until_their_next_start() {
    let session = Session::open(vec![
        person("Ann", "+7 999 000-00-00", Some(ANN)),
        person("Bob", "+7 999 000-00-00", Some(BOB)),
    ])
    .await;
    let ann_before = session.cells("Ann");

    let blocked_at = mark(&session);
    let update = session.telegram.push_bot_blocked(&ann());
    // As Telegram would, the fake now refuses sends to Ann.
    session.telegram.block_chat(ANN);
    confirmed(&session, update).await;

    session.deliver(&fixture("01_chart_png_report.eml")).await;
    wait_reports(&session, &[BOB], 1).await;
    assert!(
        calls_to_after(&session, ANN, blocked_at).is_empty(),
        "no attempt to reach Ann while she blocks the bot: {:?}",
        summary(&calls_to_after(&session, ANN, blocked_at))
    );
    assert_eq!(
        session.cells("Ann"),
        ann_before,
        "the block is not written to SeaTable"
    );

    // Ann unblocks and sends /start.
    session.telegram.clear_chat_state(ANN);
    let reply = session
        .exchange(
            &Event::Start(ann()),
            &says(texts::mailbox_list(&names(&[SALES]))),
            &[],
        )
        .await;
    session
        .deliver(&fixture("03_dashboard_pdf_report.eml"))
        .await;
    wait_reports(&session, &[ANN, BOB], 1).await;
    wait_reports(&session, &[BOB], 2).await;

    // Deliveries to one chat are in order, so an attempt at the first report would have come
    // before the second one: Ann got only the second, and nothing at all while blocked.
    let to_ann = report_calls(&session, ANN);
    assert_eq!(to_ann.len(), 1, "{:?}", summary(&to_ann));
    assert_eq!(to_ann[0].method, "sendDocument");
    assert!(
        calls_to_after(&session, ANN, blocked_at)
            .iter()
            .all(|c| c.seq >= reply.seq),
        "no call to Ann before her /start: {:?}",
        summary(&calls_to_after(&session, ANN, blocked_at))
    );
    assert_eq!(session.cells("Ann"), ann_before);
    session.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Groups: promotion
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoting_the_bot_in_a_group_binds_the_free_row() {
    check(Case {
        rows: vec![
            mailbox("Marketing", ""),
            group("Sales team", None, false).linked(&[REPORTS, "Marketing"]),
            group("Finance", None, false),
        ],
        event: Event::Promoted(TgChat::group(BASIC, "Sales team")),
        reply: group_registered("Sales team", &["Marketing", SALES]),
        writes: vec![("Sales team", bound_group("Sales team", BASIC))],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supergroup_added_directly_as_administrator_binds_the_free_row() {
    check(Case {
        rows: vec![group("Sales team", None, false)],
        event: Event::AddedAsAdmin(TgChat::supergroup(SUPER, "Sales team")),
        reply: group_registered("Sales team", &[SALES]),
        writes: vec![("Sales team", bound_group("Sales team", SUPER))],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn titles_match_after_trimming_and_collapsing_whitespace() {
    check(Case {
        rows: vec![group(" Sales  team ", None, false)],
        event: Event::Promoted(TgChat::supergroup(SUPER, "Sales   team  ")),
        reply: group_registered("Sales team", &[SALES]),
        writes: vec![(" Sales  team ", bound_group(" Sales  team ", SUPER))],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_title_with_no_row_is_not_configured() {
    check(Case {
        rows: vec![
            group("Sales team", None, false),
            group("Marketing", None, false),
        ],
        event: Event::Promoted(TgChat::group(BASIC, "  Marketing   weekly ")),
        reply: says(texts::group_not_configured("Marketing weekly")),
        writes: vec![],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn titles_are_case_sensitive() {
    check(Case {
        rows: vec![group("Sales team", None, false)],
        event: Event::Promoted(TgChat::group(BASIC, "sales team")),
        reply: says(texts::group_not_configured("sales team")),
        writes: vec![],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rows_with_the_title_are_ambiguous() {
    check(Case {
        rows: vec![
            group("Sales team", None, false),
            group("Sales team", None, false),
        ],
        event: Event::Promoted(TgChat::supergroup(SUPER, "Sales team")),
        reply: says(texts::group_ambiguous("Sales team")),
        writes: vec![],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoting_again_in_the_bound_chat_is_an_idempotent_success() {
    check(Case {
        rows: vec![group("Sales team", Some(SUPER), true)],
        event: Event::Promoted(TgChat::supergroup(SUPER, "Sales team")),
        reply: group_registered("Sales team", &[SALES]),
        writes: vec![],
    })
    .await;
}

/// A row named "Sales team" with these cells; the bot is promoted in another chat with that
/// title; the answer is group_taken and the row is unchanged.
async fn a_taken_row_is_refused(chat_id: Option<i64>, locked: bool) {
    let session = Case {
        rows: vec![group("Sales team", chat_id, locked)],
        event: Event::Promoted(TgChat::supergroup(SUPER, "Sales team")),
        reply: says(texts::group_taken("Sales team")),
        writes: vec![],
    }
    .run()
    .await;
    assert_eq!(session.cells("Sales team")["is_locked"], json!(locked));
    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_bound_and_locked_to_another_chat_is_taken() {
    a_taken_row_is_refused(Some(OTHER_SUPER), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_bound_to_another_chat_without_the_lock_is_taken() {
    a_taken_row_is_refused(Some(OTHER_SUPER), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_row_locked_without_an_id_is_taken() {
    a_taken_row_is_refused(None, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_chat_with_the_same_title_is_refused() {
    let session = Case {
        rows: vec![group("Sales team", None, false)],
        event: Event::Promoted(TgChat::group(BASIC, "Sales team")),
        reply: group_registered("Sales team", &[SALES]),
        writes: vec![("Sales team", bound_group("Sales team", BASIC))],
    }
    .run()
    .await;
    let second = Event::Promoted(TgChat::supergroup(OTHER_SUPER, "Sales team"));
    let taken = says(texts::group_taken("Sales team"));
    session.exchange(&second, &taken, &[]).await;
    session.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Groups: added as a member, removed, kicked
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_as_a_plain_member_asks_to_be_promoted() {
    check(Case {
        rows: vec![group("Sales team", None, false)],
        event: Event::Added(TgChat::group(BASIC, "Sales team")),
        reply: says(texts::ADDED_AS_MEMBER),
        writes: vec![],
    })
    .await;
}

/// The registered group loses the bot (`kicked` or `left`): no reply, the next report skips it,
/// and once it is promoted again it gets the following report.
async fn a_removed_group_is_skipped_until_promoted_again(kicked: bool) {
    let session = Session::open(vec![
        group("Sales team", Some(SUPER), true),
        person("Bob", "+7 999 000-00-00", Some(BOB)),
    ])
    .await;
    let before = session.cells("Sales team");

    let group = TgChat::supergroup(SUPER, "Sales team");
    let removed_at = mark(&session);
    let telegram = &session.telegram;
    let update = if kicked {
        let update = telegram.push_bot_kicked(&group, &admin());
        telegram.set_chat_state(SUPER, ChatState::Kicked);
        update
    } else {
        let update = telegram.push_bot_left(&group, &admin());
        telegram.set_chat_state(SUPER, ChatState::NotMember);
        update
    };
    confirmed(&session, update).await;

    session.deliver(&fixture("01_chart_png_report.eml")).await;
    wait_reports(&session, &[BOB], 1).await;
    assert!(
        calls_to_after(&session, SUPER, removed_at).is_empty(),
        "nothing goes to the group after it removed the bot: {:?}",
        summary(&calls_to_after(&session, SUPER, removed_at))
    );

    // Re-added as administrator. Updates of one chat are handled in order, so once this is
    // answered the removal was handled too, and it was not answered.
    session.telegram.clear_chat_state(SUPER);
    let reply = session
        .exchange(
            &Event::AddedAsAdmin(group),
            &group_registered("Sales team", &[SALES]),
            &[],
        )
        .await;
    assert_eq!(
        replies_after(&session, SUPER, removed_at).len(),
        1,
        "no reply to the removal"
    );
    assert!(
        calls_to_after(&session, SUPER, removed_at)
            .iter()
            .all(|c| c.seq >= reply.seq),
        "no call to the group while the bot was out: {:?}",
        summary(&calls_to_after(&session, SUPER, removed_at))
    );

    session
        .deliver(&fixture("03_dashboard_pdf_report.eml"))
        .await;
    wait_reports(&session, &[SUPER], 1).await;
    wait_reports(&session, &[BOB], 2).await;
    let to_group = report_calls(&session, SUPER);
    assert_eq!(
        to_group.len(),
        1,
        "only the report after re-adding: {:?}",
        summary(&to_group)
    );
    assert_eq!(to_group[0].method, "sendDocument");
    assert_eq!(session.cells("Sales team"), before);
    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_removed_the_bot_is_skipped_until_promoted_again() {
    a_removed_group_is_skipped_until_promoted_again(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_kicked_the_bot_is_skipped_until_promoted_again() {
    a_removed_group_is_skipped_until_promoted_again(true).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Groups: basic group → supergroup migration
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_migrates_when_the_bot_is_promoted_registers_its_new_id() {
    // Added as a member of the basic group first.
    let basic = TgChat::group(BASIC, "Sales team");
    let session = Case {
        rows: vec![group("Sales team", None, false)],
        event: Event::Added(basic.clone()),
        reply: says(texts::ADDED_AS_MEMBER),
        writes: vec![],
    }
    .run()
    .await;

    // Promoting the bot converts the group: the migration messages, then the promotion as seen
    // from the new supergroup.
    let before = mark(&session);
    session.telegram.push_migration(&basic, SUPER, &admin());
    let supergroup = Event::Promoted(TgChat::supergroup(SUPER, "Sales team"));
    supergroup.push(&session);
    let reply = reply_after(&session, SUPER, before).await;
    let expected = group_registered("Sales team", &[SALES]);
    expected.check(&reply);
    session
        .expect_cells("Sales team", &bound_group("Sales team", SUPER))
        .await;
    let to_old: Vec<_> = calls_to_after(&session, BASIC, before)
        .into_iter()
        .filter(|c| c.text.as_deref() == Some(expected.text.as_str()))
        .collect();
    assert!(
        to_old.is_empty(),
        "the success reply goes to the new chat: {:?}",
        summary(&to_old)
    );
    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_alone_moves_a_bound_row_to_the_new_id() {
    let session = Session::open(vec![
        group("Sales team", Some(BASIC), true),
        group("Finance", Some(OTHER_SUPER), true),
    ])
    .await;
    let other_before = session.cells("Finance");

    let basic = TgChat::group(BASIC, "Sales team");
    let (_, second) = session.telegram.push_migration(&basic, SUPER, &admin());
    confirmed(&session, second).await;
    session
        .expect_cells("Sales team", &bound_group("Sales team", SUPER))
        .await;
    assert_eq!(session.cells("Finance"), other_before);
    session.stop().await;
}

/// A row bound to the basic group (the bot was promoted there earlier); the group converts and
/// Telegram reports the bot's administrator status from the new supergroup: same row, new id,
/// an idempotent success in the new chat (not group_taken).
async fn a_bound_group_that_migrates_keeps_its_row(promotion_first: bool) {
    let session = Session::open(vec![group("Sales team", Some(BASIC), true)]).await;

    let basic = TgChat::group(BASIC, "Sales team");
    let promotion = Event::Promoted(TgChat::supergroup(SUPER, "Sales team"));
    let before = mark(&session);
    if promotion_first {
        promotion.push(&session);
        session.telegram.push_migration(&basic, SUPER, &admin());
    } else {
        session.telegram.push_migration(&basic, SUPER, &admin());
        promotion.push(&session);
    }
    let reply = reply_after(&session, SUPER, before).await;
    group_registered("Sales team", &[SALES]).check(&reply);
    session
        .expect_cells("Sales team", &bound_group("Sales team", SUPER))
        .await;
    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_group_migrating_then_reporting_the_promotion_keeps_its_row() {
    a_bound_group_that_migrates_keeps_its_row(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_group_reporting_the_promotion_before_the_migration_keeps_its_row() {
    a_bound_group_that_migrates_keeps_its_row(true).await;
}
