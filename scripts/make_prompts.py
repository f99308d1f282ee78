#!/usr/bin/env python3
"""Regenerate ``core/assets/prompts.jsonl``, distill's built-in instruction prompt set.

The set is meant for distilling a small chat teacher (SmolLM2-135M-Instruct) into a smaller
student on a CPU, so every prompt is English, self-contained and answerable in one to five
sentences or a short list. Most prompts are handwritten and embedded below as data; the
arithmetic word problems (and the phrasing of a few templated categories) are generated
with a fixed-seed RNG, so running this script always rewrites exactly the same file.

Usage::

    python scripts/make_prompts.py            # write core/assets/prompts.jsonl
    python scripts/make_prompts.py --check    # write, then print counts and checks
    python scripts/make_prompts.py --stdout   # print the JSONL instead of writing it

Each line is ``{"id": "<category>-<n>", "category": "<category>", "prompt": "<text>"}``;
ids are numbered from 1 within each category, and the lines are shuffled (seeded) so that
any prefix of the file mixes all categories.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

SEED = 20240611
OUT = Path(__file__).resolve().parent.parent / "core" / "assets" / "prompts.jsonl"

# ---------------------------------------------------------------------------------------------
# explanation
# ---------------------------------------------------------------------------------------------
EXPLANATION = [
    "Why is the sky blue?",
    "How does a refrigerator keep food cold?",
    "Why do leaves change colour in autumn?",
    "What causes the seasons on Earth?",
    "How does a vaccine help the body fight disease?",
    "Why does ice float on water?",
    "How do bees make honey?",
    "What causes thunder during a storm?",
    "Explain in two sentences how a rainbow forms.",
    "Why do we have leap years?",
    "How does Wi-Fi send data without wires?",
    "Why does bread dough rise before it is baked?",
    "What usually happens to borrowing when a central bank raises interest rates?",
    "Why do prices tend to go up when demand for a product increases?",
    "Explain briefly why the ancient Romans built so many roads.",
    "Why was the invention of the printing press important?",
    "How do plants make their own food?",
    "Why do cats purr?",
    "How does a microwave oven heat food?",
    "Why is regular exercise good for the heart?",
    "Explain what causes tides in the ocean.",
    "Why do people need to sleep?",
    "How does a magnetic compass work?",
    "Why does cutting an onion make people's eyes water?",
    "What makes a volcano erupt?",
    "How does recycling paper save resources?",
    "Why do many birds migrate in the autumn?",
    "How does a phone's touchscreen know where you tapped?",
    "Why is sea water salty?",
    "Explain why washing your hands helps prevent illness.",
    "How does a solar panel turn sunlight into electricity?",
    "How did people tell the time with a sundial?",
    "What causes inflation? Answer in simple terms.",
    "Why does a metal spoon feel colder than a wooden one at the same temperature?",
    "How do earthquakes happen?",
    "Why does the Moon seem to change shape during the month?",
    "In a few sentences, explain how a bicycle's gears make pedalling easier.",
    "Why do we get goosebumps?",
    "Explain how a password manager can make online accounts safer.",
    "Why did the Industrial Revolution change the way people worked?",
    "How do fish breathe underwater?",
    "Why does a balloon stick to a wall after you rub it on your hair?",
    "Explain what a food chain is, using one example.",
    "Why are coral reefs important to life in the ocean?",
    "How does GPS figure out where you are?",
    "Why do our ears pop when a plane takes off?",
    "What does the stomach do during digestion?",
    "Why do stars appear to twinkle at night?",
    "How do banks make money from loans?",
    "Explain to a child why we should drink water every day.",
    "Why do some animals hibernate in winter?",
    "How does an old-fashioned light bulb produce light?",
    "Why did the ancient Egyptians build pyramids?",
    "How does a liquid thermometer measure temperature?",
    "Why is it a good idea to wear sunscreen on sunny days?",
    "Explain why the Great Wall of China was built.",
    "How does a search engine find web pages?",
    "Why do apple slices turn brown after they are cut?",
    "What is the job of red blood cells?",
    "Why does sound travel faster in water than in air?",
    "How do clouds form?",
    "Why do countries trade with each other?",
    "What happens to a green plant that gets no sunlight for weeks?",
    "How does a rechargeable battery store energy?",
    "Why is biodiversity important for an ecosystem?",
    "How does a credit card differ from paying with cash, in terms of when the money leaves your account?",
]

# ---------------------------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------------------------
LIST = [
    "List the three primary colours used in painting.",
    "Name four planets in our solar system.",
    "Give me five fruits that are rich in vitamin C.",
    "List three ways to save water at home.",
    "Name three famous painters.",
    "List four things you need to make a cheese sandwich.",
    "What are three benefits of reading books?",
    "Name five animals that live in the ocean.",
    "List three popular programming languages.",
    "Give three examples of renewable energy sources.",
    "Name four musical instruments that have strings.",
    'List five words that rhyme with "cat".',
    "Name the seven continents.",
    "Name three gases found in the air we breathe.",
    "List four vegetables that grow underground.",
    "Name three important inventions of the 20th century.",
    "List five common kitchen utensils.",
    "Name four types of weather.",
    "What are the main parts of a flowering plant? List them.",
    "Name three countries in South America.",
    "List four sports that are played with a ball.",
    "Give four examples of insects.",
    "List three objects that a magnet would attract.",
    "Name three famous scientists and one discovery of each.",
    "List four healthy breakfast ideas.",
    "Name three simple machines.",
    "List five things you might pack for a day at the beach.",
    "Name four classic board games.",
    "List three reasons people keep pets.",
    "Name three types of clouds.",
    "List four jobs people do in a hospital.",
    "Name four herbs that are often used in cooking.",
    "List the main parts of a desktop computer.",
    "Name five farm animals.",
    "List three common symptoms of a cold.",
    "Name four shapes that have only straight sides.",
    "Give five adjectives that could describe the sea.",
    "Name three organs of the human body and what each one does.",
    "List four features of a strong password.",
    "Name two planets that have rings.",
    "List four common file formats for images.",
    "Name three major rivers in Africa.",
    "List five things you would find in a classroom.",
    "Name the three main types of rock.",
    "List four winter sports.",
    "Give three examples of citrus fruits.",
    "Name four units used to measure length.",
    "List three ways to reduce plastic waste.",
    "Name three Olympic sports that take place in water.",
    "List four things a plant needs to grow.",
    "Name five languages spoken in Europe.",
    "List three kinds of transport that run on rails.",
    "Name four animals that are active at night.",
    "List three things you should keep in a first-aid kit.",
]

# ---------------------------------------------------------------------------------------------
# rewriting (every prompt carries the sentence to rewrite)
# ---------------------------------------------------------------------------------------------
REWRITING = [
    'Rewrite this sentence in a more formal tone: "Hey, can you send me that report ASAP?"',
    'Simplify this sentence for a young reader: "The precipitation will persist throughout the afternoon."',
    'Paraphrase the following sentence: "The meeting has been postponed until next week."',
    'Make this sentence more concise: "At this point in time, we are currently in the process of reviewing your application."',
    'Rewrite this sentence in the passive voice: "The chef cooked a delicious meal."',
    'Rewrite this sentence in the active voice: "The ball was kicked by the boy."',
    'Make this request sound more polite: "Give me the menu."',
    'Rewrite this sentence in the past tense: "I walk to school every morning."',
    'Rewrite this sentence in the future tense: "We visited our grandparents."',
    'Make this sentence more exciting: "The dog ran across the park."',
    'Turn this statement into a question: "The train leaves at nine o\'clock."',
    'Turn this casual message into a professional email opening: "yo, quick question about the invoice"',
    'Rewrite this sentence so it sounds more positive: "This plan will probably fail."',
    'Replace the business jargon with plain words: "We need to leverage our synergies to optimise deliverables."',
    'Shorten this sentence to fewer than ten words: "Due to the fact that it was raining heavily, the football match was cancelled by the organisers."',
    'Rewrite this sentence in the first person: "She finished her homework before dinner."',
    'Combine these two sentences into one: "The library is quiet. It is a good place to study."',
    'Split this long sentence into two shorter ones: "We packed the car early in the morning and drove for five hours until we reached the coast, where we found a small hotel with a view of the harbour."',
    'Rewrite this with a friendlier tone: "Your request has been denied."',
    'Make this sentence more descriptive: "The house was old."',
    'Rewrite this sentence as a newspaper headline: "A local cat saved its owner from a kitchen fire yesterday."',
    'Rewrite this sentence without using the word "very": "The soup was very hot and very salty."',
    'Change this to reported speech: He said, "I am tired."',
    'Change this sentence from plural to singular: "The children are playing in the gardens."',
    'Make this sentence gender-neutral: "Every student should bring his own book."',
    'Rewrite this in a more confident tone: "I think maybe I could possibly help with the project."',
    'Rewrite this in simpler words: "The physician recommended that the patient abstain from consuming sugary beverages."',
    'Rewrite this announcement as a short social media post: "Our bakery is opening a second shop downtown next Saturday, with free coffee for the first fifty customers."',
    'Rewrite this sentence using a metaphor: "She was very brave."',
    'Remove the redundant word from this sentence: "Please return back the book to the library."',
    'Rewrite this sentence in a formal style: "The boss is super mad about the late delivery."',
    'Rewrite this sentence in a casual, friendly style: "We regret to inform you that the event has been cancelled."',
    'Rewrite this sentence as a direct instruction: "You should probably close the window."',
    'Rewrite this sentence in the negative form: "He likes coffee."',
    'Rewrite this text to avoid repetition: "The cake was good. The cake was sweet. The cake was soft."',
    'Rewrite this sentence so a seven-year-old can understand it: "Photosynthesis converts light energy into chemical energy."',
    'Change this sentence to the present continuous tense: "They eat lunch."',
    'Rewrite this message in a calm, polite tone: "STOP SENDING ME THESE EMAILS!"',
    'Rewrite this sentence to make it clearer: "The report that the manager who was new wrote was long."',
    'Join these sentences using the word "although": "It was cold. We went swimming."',
    'Rewrite this as a polite apology to a customer: "Your package arrived late."',
    'Fix the capitalisation in this sentence: "i visited paris in june with my friend anna."',
    "Correct the grammar in this sentence: \"She don't like apples and he don't neither.\"",
    'Rewrite this sentence from the point of view of the dog: "The girl threw the stick into the lake."',
    'Make this product sentence more persuasive: "This chair is comfortable."',
    'Rewrite this sentence so it is less wordy: "In my personal opinion, I think that the film was really quite long."',
    'Paraphrase this sentence in plain English: "Do not count your chickens before they hatch."',
    'Rewrite this note so it sounds more urgent: "The server may need to be restarted at some point."',
    'Rewrite the following in the third person: "I am learning to play the guitar."',
]

# ---------------------------------------------------------------------------------------------
# creative (very short)
# ---------------------------------------------------------------------------------------------
CREATIVE = [
    "Write a four-line poem about the rain.",
    "Write a haiku about autumn leaves.",
    "Suggest a catchy slogan for a bicycle shop.",
    "Write the first two sentences of a story about a lost robot.",
    "Write a short product description for a reusable water bottle.",
    "Write a limerick about a cat who loves cheese.",
    "Suggest a name for a small coffee shop by the sea.",
    "Write a two-line rhyme about Monday mornings.",
    "Write a short birthday message for a friend who loves hiking.",
    "Describe a sunrise in three sentences.",
    "Write an opening line for a mystery story set in a library.",
    "Write a slogan that encourages people to recycle.",
    "Write a short poem about the moon for young children.",
    "Invent a new ice cream flavour and describe it in two sentences.",
    "Write a haiku about a city at night.",
    "Write a product description for a pair of wireless headphones.",
    "Write the opening of a story about a girl who finds a tiny door in a tree.",
    "Write a short thank-you note to a teacher.",
    "Write a tagline for a fitness app.",
    "Write a four-line poem about friendship.",
    "Describe a busy market in three sentences, using sight, sound and smell.",
    "Write the first sentence of a fairy tale about a dragon who is afraid of fire.",
    "Create a motto for a school science club.",
    "Write a short advertisement for a children's lemonade stand.",
    "Write a haiku about the ocean.",
    "Invent a name and a one-sentence description for a new board game.",
    "Write a two-sentence spooky story that is suitable for children.",
    "Write a short toast for a friend's wedding.",
    "Write a three-line poem about a morning cup of coffee.",
    "Describe a cosy cabin in winter in two sentences.",
    "Write a slogan for a public library.",
    "Begin a short fable about a fox and a crow.",
    "Write a product description for a smart alarm clock.",
    'Write a short riddle whose answer is "a shadow".',
    "Write a cheerful weather forecast for tomorrow as a pirate would say it.",
    "Write an acrostic poem using the word SUN.",
    "Write a postcard message from a holiday in the mountains.",
    "Write a short motivational quote about learning something new.",
    "Describe a city of the future in three sentences.",
    "Write the opening paragraph of a story about a chef who can travel in time.",
    "Write a two-line jingle for a toothpaste brand.",
    "Write a short poem about a lighthouse.",
    "Describe a magical forest for a fantasy video game in two or three sentences.",
    "Invent a superhero and describe their power in two sentences.",
    "Write a haiku about spring.",
    "Write a four-line dialogue between a cat and a dog.",
    "Write a short welcome message for a new member of a book club.",
    "Suggest a name for a pet goldfish and explain your choice in one sentence.",
    "Write a short invitation to a picnic in the park on Sunday.",
    "Write a tagline for an electric car.",
    "Write a short poem about the sound of the wind.",
    "Write a one-sentence menu description for a tomato soup.",
    "Write a short lullaby of four lines.",
    "Write the opening line of a science fiction story set on Mars.",
]

# ---------------------------------------------------------------------------------------------
# classification (the text and the allowed labels are always given)
# ---------------------------------------------------------------------------------------------
_SENTIMENT = [
    "The pizza arrived hot and the crust was perfect. I will order again.",
    "The battery died after two days and customer support never replied.",
    "The hotel room was clean, but the breakfast was just average.",
    "Absolutely loved this book, I finished it in one evening!",
    "The shoes look nice but they hurt my feet after an hour.",
    "The film was fine. Nothing special, nothing terrible.",
    "Fast delivery, great price, and the blender works like a dream.",
    "Worst haircut I have ever had. I will not be going back.",
    "The staff were friendly and the museum was fascinating.",
    "The app crashes every time I try to upload a photo.",
    "It does what it says. The colour is slightly different from the picture.",
    "This jacket kept me warm on the coldest day of the year. Highly recommended.",
    "The concert started an hour late and the sound was terrible.",
    "I bought this kettle last month and use it every morning.",
    "My kids adore this puzzle and it has kept them busy for hours.",
    "The soup was cold and the waiter was rude.",
    "The instructions were clear and setup took five minutes.",
    "The package arrived on Tuesday as expected.",
]
_SENTIMENT_TEMPLATES = [
    'Classify the sentiment of this review as positive, negative or neutral: "{t}"',
    'Is the following customer review positive, negative or neutral? Review: "{t}"',
    'Review: "{t}"\nLabel the sentiment of this review. Choose one: positive, negative, neutral.',
]
_HEADLINES = [
    "Local team wins national football championship after penalty shoot-out",
    "New smartphone chip promises twice the battery life",
    "Parliament votes on new tax law after long debate",
    "Study finds that walking daily lowers the risk of heart disease",
    "Oil prices fall as global demand slows",
    "Astronomers discover a planet orbiting two stars",
    "Famous singer announces world tour for next summer",
    "Start-up raises ten million dollars to build delivery robots",
    "Tennis star retires after twenty years on the tour",
    "Doctors warn of a rise in flu cases this winter",
    "Prime minister meets European leaders to discuss trade",
    "Scientists map the genome of an ancient wheat variety",
    "Streaming service adds hundreds of classic films to its library",
    "Software update fixes security flaw in popular web browser",
]
_HEADLINE_TEMPLATES = [
    'Classify the topic of this headline as sports, politics, technology, health, business, science or entertainment: "{t}"',
    'Headline: "{t}"\nWhich category does this headline belong to: sports, politics, technology, health, business, science or entertainment?',
]
_EMAILS = [
    "Congratulations! You have won a free cruise. Click this link within 24 hours to claim your prize!",
    "Hi Sam, the team meeting has moved to 3 pm on Thursday. See you there. - Priya",
    "URGENT: Your bank account is locked. Send your password to unlock it now.",
    "Dear customer, your order #4821 has shipped and should arrive on Friday.",
    "Earn $5,000 a week from home with no experience! Reply YES to start today!",
    "Hello Mum, I landed safely and will call you tonight after dinner.",
    "You are pre-approved for a loan! No credit check needed, just pay a small fee first.",
    "Reminder: the library book you borrowed is due back on Monday.",
    "Cheap watches, 90% off, limited stock, buy now buy now buy now!!!",
    "Hi all, attached are the slides from today's lecture. Let me know if you have questions.",
]
_EMAIL_TEMPLATES = [
    'Is this email spam or not spam? Email: "{t}"',
    'Classify the following message as spam or not spam, and give a one-sentence reason.\nMessage: "{t}"',
]
_CLASSIFICATION_MISC = [
    'Is this sentence a fact or an opinion? Answer "fact" or "opinion": "Water boils at 100 degrees Celsius at sea level."',
    'Is this sentence a fact or an opinion? Answer "fact" or "opinion": "Summer is the best season of the year."',
    "Classify each animal as a mammal, bird, reptile or fish: dolphin, eagle, crocodile, salmon.",
    'Is the following text formal or informal? "Gonna grab some food, wanna come?"',
    'Is the following text formal or informal? "We kindly request that all attendees arrive by 9 a.m."',
    'Classify this customer message by urgency as high, medium or low: "Our whole website is down and customers cannot pay."',
    'Classify this customer message by urgency as high, medium or low: "Could you update the font on our invoice template when you have time?"',
    "Label each food as a fruit or a vegetable: banana, carrot, strawberry, spinach.",
    'Is this sentence a question, a command or a statement? "Please shut the door."',
    'Decide whether this support ticket is about billing, shipping or a technical problem: "I was charged twice for the same order."',
    'Classify the emotion in this sentence as joy, sadness, anger or fear: "I can\'t believe they cancelled my flight again!"',
    'Classify the emotion in this sentence as joy, sadness, anger or fear: "We finally adopted a puppy today!"',
    "Sort these words into nouns and verbs: run, table, eat, window, jump, river.",
    "Is each of these materials a solid, a liquid or a gas at room temperature: iron, milk, oxygen, wood?",
]

# ---------------------------------------------------------------------------------------------
# extraction (the text is always given)
# ---------------------------------------------------------------------------------------------
EXTRACTION = [
    'Extract all the people\'s names from this text: "Maria met Tom and Aisha at the station, and later they called Daniel."',
    'List every city mentioned in this sentence: "Last year I flew from Lisbon to Berlin, then took a train to Prague and Vienna."',
    'What date is mentioned in this text? "The conference will take place on 14 March 2025 in the main hall."',
    'Pull out all the numbers from this text: "The shop sold 42 apples, 17 pears and 8 melons on Saturday."',
    'Find the email address in this message: "For questions, write to help@example.com or call the front desk."',
    'From the text below, extract the product name and its price.\nText: "The new Aurora desk lamp costs $39 and comes in three colours."',
    'Extract the time and place of the meeting: "Let\'s meet at 4:30 pm outside the Central Library."',
    'Which countries are mentioned in this sentence? "The river flows through Germany, Austria and Hungary before reaching Serbia."',
    'Extract the names of the companies from this text: "Greenleaf Foods and Bluewave Energy announced a partnership on Monday."',
    'Find the phone number in this text: "Call our office on 555-0142 between 9 and 5."',
    'List the ingredients mentioned in this sentence: "Mix flour, sugar and two eggs, then add a cup of milk."',
    'From this sentence, extract who did what: "Leila repaired the broken fence on Sunday."',
    'Extract the year each event happened: "The bridge opened in 1932, was damaged in 1953 and was rebuilt in 1961."',
    'What is the total amount of money mentioned in this text? "I spent $12 on lunch and $8 on a taxi."',
    'Extract the departure and arrival cities from this booking: "Flight BA204 departs Madrid at 07:15 and arrives in Dublin at 09:05."',
    'Find all the colours mentioned in this text: "She wore a red scarf, a green coat and blue boots."',
    'Pick out the dates in this note: "Submit the draft by 2 May and the final version by 30 May."',
    'Extract the name, age and job from this sentence: "Carlos, 34, works as a nurse in a busy hospital."',
    'List the animals mentioned in this story: "On the farm, the goat chased the chickens while the old dog slept next to a cat."',
    'Extract the author and title from this sentence: "My favourite novel is The Quiet River by Helen Marsh."',
    'Which days of the week are mentioned here? "The gym is closed on Monday but open late on Wednesday and Friday."',
    'Find the website address in this text: "Tickets are available at www.cityfestival.org from June."',
    'Extract the temperatures from this weather report: "Tomorrow will start at 8 degrees and reach a high of 21 degrees by the afternoon."',
    'From this invoice line, extract the quantity, item and unit price: "3 x notebook @ $2.50"',
    'List the names of the rivers in this text: "The Thames, the Seine and the Danube are among Europe\'s best-known rivers."',
    'Extract the address from this message: "Please deliver the parcel to 12 Oak Street, Springfield."',
    'What percentage is mentioned in this sentence, and what does it refer to? "About 70 percent of the Earth\'s surface is covered by water."',
    'Extract the names of the languages mentioned: "She speaks Spanish at home, English at work and is learning Japanese."',
    'Who are the sender and the recipient of this note? "Dear Mr Evans, thank you for your help last week. Best wishes, Olivia Grant."',
    'List all the sports mentioned in this text: "The school offers swimming, basketball and chess, and next year it will add tennis."',
    'Extract the start time and the duration of the event: "The workshop starts at 10 am and lasts two hours."',
    'Find the measurements in this text: "The table is 120 cm long, 80 cm wide and 75 cm high."',
    'Extract the names of the planets mentioned: "The probe passed Venus before heading towards Jupiter and Saturn."',
    'From this sentence, extract the problem and the requested action: "My laptop will not turn on, please send a technician."',
    'Extract every word that starts with a capital letter from this sentence: "On Friday, Ana and Li visited the British Museum in London."',
    'List the book titles mentioned in this text: "For the summer, the class will read Treasure Island and Little Women."',
    'Extract the key facts (who, what, where) from this headline: "Firefighters rescue kitten from tree in Oakville"',
    'Find the order number and the delivery date in this message: "Your order 77-5120 will be delivered on 9 October."',
    'List the hobbies mentioned in this sentence: "In his free time, Jamal enjoys painting, cycling and baking bread."',
    'Extract the prices and find which item is the cheapest: "Tea costs $3, coffee costs $4 and juice costs $2."',
    'Extract the names of the mountains in this text: "Climbers tried Everest and K2 before finally reaching the top of Kilimanjaro."',
    'From this recipe step, extract the oven temperature and the baking time: "Bake at 180 degrees Celsius for 25 minutes."',
    'List all the verbs in this sentence: "The children laughed, sang and danced in the rain."',
    'Extract the names of the people and their roles: "The director, Ms Patel, thanked the treasurer, Mr Okoro, at the meeting."',
    'Find the two cities and the distance between them in this text: "The road from Lyon to Marseille is about 315 kilometres long."',
    'Which months are mentioned in this text? "The farm picks strawberries in June and apples in September and October."',
]

# ---------------------------------------------------------------------------------------------
# code (tiny Python tasks)
# ---------------------------------------------------------------------------------------------
CODE = [
    "Write a Python function that returns the square of a number.",
    "Write a Python function that checks whether a number is even.",
    "Write a Python function that reverses a string.",
    "Write a Python function that returns the largest number in a list without using max().",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that converts a temperature from Celsius to Fahrenheit.",
    "Write a Python function that returns the sum of all numbers in a list.",
    "Write a Python function that checks whether a word is a palindrome.",
    "Write a Python function that returns the average of a list of numbers.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
    "Write a Python function that returns the factorial of n using a loop.",
    "Write a Python function that counts how many times each word appears in a sentence.",
    "Write a short Python loop that prints the numbers from 1 to 5.",
    "Write a Python function that returns True if a year is a leap year.",
    "Write one line of Python that creates a list of the squares of 1 to 10.",
    "Write a Python function that joins a list of words into one sentence separated by spaces.",
    "Write a Python function that returns only the positive numbers from a list.",
    "Write a Python function that capitalises the first letter of every word in a string.",
    'What does this Python code print?\nprint(len("hello"))',
    'What does this Python code print?\nprint(3 * "ab")',
    "What does this Python code print?\nprint([1, 2, 3][-1])",
    "What does this Python code print?\nprint(10 // 3, 10 % 3)",
    'What does this Python code print?\nprint("Python".upper())',
    "What does this Python code print?\nprint(sorted([3, 1, 2]))",
    "What does this Python code print?\nprint(sum(range(5)))",
    'What does this Python code print?\nprint("a,b,c".split(","))',
    "What does this Python code print?\nx = [1, 2]\nx.append(3)\nprint(x)",
    "What does this Python code print?\nprint(bool(0), bool(5))",
    'What does this Python code print?\nprint({"a": 1, "b": 2}["b"])',
    'What does this Python code print?\nprint("hello"[1:4])',
    "Find and fix the bug in this Python function:\ndef add(a, b):\n    return a - b",
    "Fix the error in this Python code:\nfor i in range(3)\n    print(i)",
    "This function should return the last item of a list but fails. Fix it:\ndef last(items):\n    return items[len(items)]",
    'Why does this Python code raise an error, and how do you fix it?\nage = 25\nprint("Age: " + age)',
    "Fix the bug: this function should count down from n to 1.\ndef countdown(n):\n    while n > 0:\n        print(n)",
    'This code should print "even" for even numbers. What is wrong?\nif n % 2 = 0:\n    print("even")',
    "Explain in one or two sentences what a Python list comprehension is.",
    "What is the difference between a list and a tuple in Python? Answer briefly.",
    'Explain what the Python keyword "return" does in a function.',
    "What does the Python function len() do? Give a short example.",
    "Write a Python dictionary that stores the capitals of France, Spain and Italy.",
    "Write a Python function that returns the number of characters in a string, not counting spaces.",
    'Write a Python function that takes a name and returns the greeting "Hello, <name>!".',
    "Write a Python function that returns the smaller of two numbers.",
    "Write a Python function that checks whether a list is empty.",
    "Explain what this Python line does: squares = {n: n * n for n in range(4)}",
    "Write a Python function that converts minutes into hours and minutes, e.g. 135 -> (2, 15).",
    "How do you open a text file and read all its lines in Python? Show a short example.",
]

# ---------------------------------------------------------------------------------------------
# advice
# ---------------------------------------------------------------------------------------------
ADVICE = [
    "Give me three tips for studying more effectively for an exam.",
    "How can I fall asleep faster at night?",
    "What are some simple ways to save money on groceries?",
    "I am travelling abroad for the first time. What should I remember to bring?",
    "How can I stay focused when working from home?",
    "What is a good way to start learning a new language?",
    "How can I make my cooking less salty without losing flavour?",
    "Give two tips for speaking confidently in a job interview.",
    "How can I build a habit of exercising regularly?",
    "What should I do if I feel stressed before a presentation?",
    "How can I keep my houseplants healthy?",
    "Suggest a few ways to reduce time spent on my phone.",
    "What are some tips for cooking rice so it is not sticky?",
    "How should I prepare for a long-distance bus journey?",
    "I often forget birthdays. How can I remember them better?",
    "What is a sensible way to start a monthly budget?",
    "How can I make my morning routine less rushed?",
    "Give three tips for writing a clear email at work.",
    "How can I keep vegetables fresh for longer in the fridge?",
    "What can I do to make a small bedroom feel bigger?",
    "How can I be a better listener?",
    "What are some tips for running my first 5 km race?",
    "How should I take notes during a lecture?",
    "I have a long flight tomorrow. How can I reduce jet lag?",
    "How can I stay safe when walking home at night?",
    "What are easy ways to drink more water during the day?",
    "How can I politely say no when a colleague asks for too much help?",
    "What should a beginner know before buying a second-hand car?",
    "Give me some tips for keeping a tidy desk.",
    "How can I make friends after moving to a new city?",
    "What are good habits for protecting my eyes when using a computer all day?",
    "How can I encourage a child to read more?",
    "What should I do if I lose my passport while travelling?",
    "How can I make meal planning for the week easier?",
    "What are some tips for a successful video call?",
    "How can I start saving for an emergency fund on a small income?",
    "Give three tips for staying warm in winter without raising the heating bill.",
    "How can I stop procrastinating on a big project?",
    "How do I prepare for my first day at a new job?",
    "What are some ways to reduce food waste at home?",
    "How can I keep my luggage light for a week-long trip?",
    "What are some healthy snacks to eat while studying?",
    "How can I get better at remembering people's names?",
    "What should I consider before adopting a dog?",
    "How can I give helpful feedback to a teammate?",
    "How can I take better photos with my phone?",
]

# ---------------------------------------------------------------------------------------------
# summarise (paragraphs written for this set)
# ---------------------------------------------------------------------------------------------
_PARAGRAPHS = [
    "Honeybees live in large colonies ruled by a single queen. Worker bees collect nectar and pollen from flowers and bring them back to the hive. The nectar is turned into honey, which feeds the colony during winter. While they collect food, bees also carry pollen between plants, which helps many crops grow.",
    "The town library has started lending more than books. Visitors can now borrow board games, telescopes and even sewing machines. The librarians say the idea is to share useful things that people only need once in a while. So far, the telescopes have been the most popular item.",
    "Maya wanted to run a marathon, but at first she could barely run for ten minutes. She made a plan and added a little distance every week. Some weeks were hard, and she had to rest a sore knee. Eight months later, she crossed the finish line with a smile.",
    "Electric scooters have become common in many cities. They are cheap to rent and help people make short trips without a car. However, some residents complain that scooters are left blocking pavements. Several cities now require riders to park them in marked areas.",
    "Sleep plays an important role in memory. While we sleep, the brain sorts the information gathered during the day and stores the important parts. Students who sleep well after studying often remember more than those who stay up late. Experts suggest regular bedtimes during exam periods.",
    "The old bridge in the village was closed last spring after engineers found cracks in its supports. Villagers had to drive twenty minutes around the river to reach the school. After months of work, the repaired bridge reopened this week. Parents say mornings are much calmer now.",
    "Octopuses are among the most intelligent animals in the sea. They can open jars, solve simple puzzles and escape from tanks. Each of their eight arms contains many nerve cells, so the arms can react on their own. Scientists study them to learn how different kinds of brains work.",
    "A small bakery in the city centre has started giving away its unsold bread every evening. Instead of throwing food away, the owners put it in a basket by the door. Anyone can take a loaf for free. Neighbours say the idea has brought the community closer together.",
    "The printing press was developed in Europe in the fifteenth century. Before it, books were copied by hand, which was slow and expensive. With printing, books became cheaper and more common. This helped ideas spread quickly and made reading possible for many more people.",
    "Many people drink coffee to feel more awake. Coffee contains caffeine, which blocks a chemical in the brain that makes us feel tired. The effect usually lasts a few hours. Drinking coffee late in the day, however, can make it harder to fall asleep.",
    "Last Saturday, volunteers cleaned up the beach near the harbour. They collected more than two hundred bags of rubbish, most of it plastic bottles and food wrappers. The organisers plan to repeat the event every month. They hope that fewer people will leave litter once they see the results.",
    "Desert plants have clever ways of surviving with little water. Cacti store water in their thick stems and have spines instead of leaves to lose less moisture. Some plants have very long roots that reach water deep underground. Others stay dormant for years and only grow after rare rains.",
    "Our company is changing its working hours from next month. Staff will be able to start any time between 7 and 10 in the morning. Everyone must still be available for meetings between 10 and 3. Managers hope the change will reduce stress and traffic delays.",
    "Learning to play a musical instrument takes patience. Beginners often feel frustrated because progress seems slow. Practising a little every day works better than one long session per week. Over time, the fingers learn the movements and playing becomes more natural.",
    "The Amazon rainforest covers a huge area of South America. It is home to millions of species of plants, insects and animals. The forest also absorbs large amounts of carbon dioxide from the air. Cutting down the trees threatens wildlife and affects the global climate.",
    "Tom forgot his umbrella on the morning of his job interview. On the way, a sudden storm soaked him completely. He arrived dripping wet and apologised to the interviewer, who simply laughed and handed him a towel. Two days later, he got the job.",
    "Recycling glass is simple and useful. Glass can be melted and reshaped again and again without losing quality. Making new bottles from old glass uses less energy than making them from raw materials. Many towns have special bins for glass of different colours.",
    "Video calls became part of everyday life for many families in recent years. Grandparents used them to see their grandchildren, and friends used them to share meals from a distance. Although a screen cannot replace a hug, many people found the calls comforting. Some families still keep a weekly call today.",
    "A healthy breakfast can help people concentrate during the morning. Foods such as oats, eggs, fruit and yoghurt release energy slowly. Sugary cereals may give a quick boost but often lead to tiredness later. Even a simple piece of toast with peanut butter is better than skipping breakfast.",
    "The school garden project started with a few pots of tomatoes. Now the students grow lettuce, beans, herbs and strawberries. They learn about soil, insects and weather while they work. In the summer, the vegetables are used in the school kitchen.",
    "Volcanoes form where molten rock from deep inside the Earth reaches the surface. When pressure builds up, the volcano can erupt and throw out lava, ash and gas. Eruptions can be dangerous, but volcanic soil is often very fertile. That is why many farms are found near old volcanoes.",
    "The museum has opened a new room about the history of flight. It shows early gliders, models of the first aeroplanes and a real jet engine. Children can sit in a copy of a cockpit and try a flight simulator. The exhibition will remain open until the end of the year.",
    "Lena had always been afraid of deep water. Last summer she decided to take swimming lessons with a patient teacher. At first she only practised in the shallow end, holding the side of the pool. By August, she could swim a full length on her own.",
    "Fresh water makes up only a small part of all the water on Earth. Most of it is frozen in ice caps and glaciers, and much of the rest is underground. People rely on rivers, lakes and wells for drinking and farming. Saving water helps protect this limited supply.",
    "The new version of the app adds a dark mode and faster search. It also fixes a bug that made some photos upload twice. Users who update will need to sign in again once. The developers thank everyone who reported problems.",
    "Wolves live and hunt in groups called packs. A pack is usually a family made up of parents and their young. By working together, wolves can catch animals much larger than themselves. They communicate with howls, body language and scent.",
    "Our neighbourhood has started a tool-sharing group online. Members list tools they are willing to lend, such as ladders, drills and lawnmowers. Anyone who needs one sends a message and picks it up. The group has saved people money and helped neighbours get to know each other.",
    "Chocolate comes from the seeds of the cacao tree, which grows in warm, wet regions. The seeds are fermented, dried and roasted before they are ground into a paste. Sugar and milk are added to make most of the chocolate we eat. Dark chocolate contains more cacao and less sugar.",
    "Working in short focused blocks can improve productivity. One popular method is to work for twenty-five minutes and then take a five-minute break. The breaks help the mind rest and make it easier to start again. After four blocks, a longer break is recommended.",
    "The city marathon will take place on Sunday, and several roads will be closed from 6 a.m. to 2 p.m. Buses will follow different routes during that time. Residents are asked to avoid driving in the centre. Spectators are welcome to cheer along the course.",
    "Penguins are birds, but they cannot fly. Their wings have become flippers that make them excellent swimmers. Most penguins live in the Southern Hemisphere, especially around Antarctica. They keep warm with thick layers of fat and tightly packed feathers.",
    "When Ahmed moved to a new country, he did not speak the language. He joined a conversation group at the community centre and practised every week. He also watched children's programmes, which used simple words. After a year, he could chat easily with his neighbours.",
    "Bicycles are one of the most efficient ways to travel. A cyclist can cover several kilometres with little effort and no fuel. Cycling also improves fitness and reduces traffic in crowded cities. Many cities are building protected bike lanes to make riding safer.",
    "The river that runs through the town flooded after three days of heavy rain. Water entered several shops on the main street, and the market was cancelled. Volunteers filled sandbags to protect homes. The water level has now dropped, and the clean-up has begun.",
    "Spiders are often feared, but most are harmless to people. They eat large numbers of insects, including flies and mosquitoes. Many spiders spin webs made of silk, which is very strong for its weight. Without spiders, there would be far more insect pests.",
    "The cafe on the corner has changed its menu to include more vegetarian dishes. The owner says many customers asked for lighter and cheaper options. The new menu includes soups, salads and a popular lentil burger. Meat dishes are still available on weekends.",
    "Ancient sailors found their way across the sea without modern tools. They watched the positions of the Sun and stars to know their direction. They also studied winds, waves and the flight of birds. These skills allowed them to travel long distances between islands.",
    "Backing up your files protects you from losing important work. A computer can break, be stolen or be infected by a virus. Copying your files to an external drive or a cloud service means you can restore them later. Experts recommend making backups regularly and testing them.",
    "Elephants are the largest land animals on Earth. They live in family groups led by an older female. Elephants use their trunks to breathe, smell, drink and pick things up. They are known for their strong memory and close social bonds.",
    "The community choir is looking for new members of all ages. No experience is needed, and rehearsals are held every Tuesday evening at the town hall. The choir performs at local events and a concert each December. Anyone interested can simply come along to a rehearsal.",
    "Mushrooms are not plants but belong to a group called fungi. They do not use sunlight to make food. Instead, they take nutrients from dead leaves, wood and soil. By breaking down dead material, fungi help return nutrients to the earth.",
    "Carla opened a small bookshop in a quiet street five years ago. At first, very few customers came in. She began hosting readings and a children's story hour on Saturdays. Today the shop is busy, and people from other towns visit it.",
]
_SUMMARY_TEMPLATES = [
    "Summarise the following paragraph in one sentence.\n\n{t}",
    "{t}\n\nSummarise this in one sentence.",
    "Read the text and give a one-sentence summary.\n\n{t}",
    "Write a one-sentence summary of this paragraph:\n{t}",
    "{t}\n\nWhat is the main point of this paragraph? Answer in one sentence.",
]

# ---------------------------------------------------------------------------------------------
# comparison (pairs; the phrasing is picked by the seeded RNG)
# ---------------------------------------------------------------------------------------------
_COMPARISON_PAIRS = [
    ("weather", "climate"),
    ("a virus", "a bacterium"),
    ("a frog", "a toad"),
    ("a computer's RAM", "its hard drive"),
    ("a simile", "a metaphor"),
    ("an alligator", "a crocodile"),
    ("baking soda", "baking powder"),
    ("a hurricane", "a tornado"),
    ("a comet", "an asteroid"),
    ("a democracy", "a monarchy"),
    ("a loan", "a grant"),
    ("an ocean", "a sea"),
    ("a debit card", "a credit card"),
    ("an email", "a text message"),
    ("a city", "a village"),
    ("speed", "velocity"),
    ("a hill", "a mountain"),
    ("a butterfly", "a moth"),
    ("renewable energy", "non-renewable energy"),
    ("a lake", "a river"),
    ("a web browser", "a search engine"),
    ("a stock", "a bond"),
    ("a wolf", "a pet dog"),
    ("mass", "weight"),
    ("a museum", "a library"),
    ("a novel", "a short story"),
    ("a rabbit", "a hare"),
    ("a laptop", "a tablet"),
    ("a herbivore", "a carnivore"),
    ("a common cold", "the flu"),
    ("boiling", "simmering"),
    ("renting a home", "buying a home"),
    ("an island", "a peninsula"),
    ("a star", "a planet"),
    ("a sprint", "a marathon"),
    ("a vegetarian diet", "a vegan diet"),
    ("an atom", "a molecule"),
    ("imports", "exports"),
    ("a violin", "a cello"),
    ("a kilometre", "a mile"),
    ("hardware", "software"),
    ("a dictionary", "a thesaurus"),
    ("saving money", "investing money"),
    ("a solar eclipse", "a lunar eclipse"),
    ("a symptom", "a disease"),
    ("a wholesaler", "a retailer"),
    ("an autobiography", "a biography"),
]
_COMPARISON_TEMPLATES = [
    "What is the difference between {a} and {b}?",
    "How is {a} different from {b}?",
    "Compare {a} and {b} in two sentences.",
    "Explain the main difference between {a} and {b}.",
    "Briefly, how do {a} and {b} differ?",
    "What sets {a} apart from {b}? Keep it short.",
]

# ---------------------------------------------------------------------------------------------
# definition (terms; the phrasing is picked by the seeded RNG)
# ---------------------------------------------------------------------------------------------
_DEFINITION_TERMS = [
    "photosynthesis",
    "democracy",
    "gravity",
    "algorithm",
    "inflation",
    "biodiversity",
    "budget",
    "empathy",
    "habitat",
    "ecosystem",
    "carbon footprint",
    "hypothesis",
    "procrastination",
    "pixel",
    "antonym",
    "erosion",
    "evaporation",
    "compound interest",
    "firewall",
    "mammal",
    "nostalgia",
    "prime number",
    "fossil",
    "currency",
    "vertebrate",
    "idiom",
    "resilience",
    "omnivore",
    "galaxy",
    "supply and demand",
    "URL",
    "invoice",
    "humidity",
    "palindrome",
    "insulation",
    "calorie",
    "software bug",
    "equator",
    "dividend",
    "spreadsheet",
    "allergy",
    "etiquette",
    "freelancer",
    "pandemic",
    "metabolism",
    "renewable resource",
    "recession",
    "cloud storage",
    "migration",
]
_DEFINITION_TEMPLATES = [
    'What does the term "{x}" mean?',
    'Define "{x}" in one sentence.',
    'What is meant by "{x}"?',
    'Give a simple definition of "{x}" with a short example.',
    'Explain what "{x}" means as if to a ten-year-old.',
    'What does "{x}" mean? Answer in one or two sentences.',
]
_DEFINITION_IDIOMS = [
    'What does the idiom "break the ice" mean?',
    'What does it mean when someone says a task is "a piece of cake"?',
    'What does the phrase "under the weather" mean?',
    'If something happens "once in a blue moon", how often does it happen?',
    'What does the expression "cost an arm and a leg" mean?',
    'What does "hit the books" mean?',
]

# ---------------------------------------------------------------------------------------------
# how-to (short step lists)
# ---------------------------------------------------------------------------------------------
HOW_TO = [
    "How do I boil an egg so the yolk is firm?",
    "How do you plant a seed in a flower pot?",
    "Explain step by step how to make a cup of tea.",
    "How do I fix a flat bicycle tyre? Keep the steps short.",
    "Give short instructions for folding a simple paper aeroplane.",
    "How do I take a screenshot on a Windows computer?",
    "What are the steps to create a strong, memorable password?",
    "How should I wash a wool jumper by hand?",
    "How do I write a short thank-you letter?",
    "What are the steps to restart a home Wi-Fi router?",
    "How do I make a simple salad dressing?",
    "How do you sew a button back onto a shirt?",
    "How do I clean a computer keyboard safely?",
    "Give me a simple recipe for pancakes in a few steps.",
    "How can I check my pulse with my fingers?",
    "How do I cook dried pasta?",
    "How do you make coffee with a French press?",
    "How do I remove a fresh coffee stain from a cotton shirt?",
    "What are the steps for writing a good one-page CV?",
    "How do I wrap a present neatly?",
    "How do you plant a young tree in the garden?",
    "Explain how to make a fruit smoothie.",
    "How do I back up the photos on my phone?",
    "How do I write a to-do list that actually helps me?",
    "How do you start a compost bin at home?",
    "How do I iron a shirt? List the main steps.",
    "How do I make scrambled eggs?",
    "How do I clean a window without leaving streaks?",
    "What steps should I follow to plan a small birthday party?",
    "How do I create a new folder on a computer?",
    "Explain how to make a simple bird feeder from a plastic bottle.",
    "How should I prepare for a day hike?",
    "What are a few simple stretches to do before a run, and how do I do them?",
    "How do I start learning to juggle three balls?",
    "How do I install a Python package with pip?",
    "How do you cook white rice in a pot?",
    "What should I do to clean and cover a small cut on my finger?",
    "How do I prepare a short speech for a friend's birthday?",
    "How do I hang a picture on a wall?",
    "How do I make hot chocolate on the stove?",
    "In a few steps, how can I organise a messy bookshelf?",
    "How do you make a paper snowflake?",
    "How do I set an out-of-office reply in an email program? Give general steps.",
    "What are the steps to make a grilled cheese sandwich?",
    "How do I repot a houseplant that has outgrown its pot?",
    "How do I make a simple budget for one month?",
    "Give me the steps to make a basic vegetable stir-fry.",
]

# ---------------------------------------------------------------------------------------------
# analogy
# ---------------------------------------------------------------------------------------------
ANALOGY = [
    "Complete the analogy: bird is to nest as bee is to ___.",
    "Complete the analogy: hot is to cold as up is to ___.",
    "Complete the analogy: pen is to writer as brush is to ___.",
    "Complete the analogy: puppy is to dog as kitten is to ___.",
    "Complete the analogy: glove is to hand as sock is to ___.",
    "Complete the analogy: fish is to water as bird is to ___.",
    "Complete the analogy: day is to night as summer is to ___.",
    "Complete the analogy: book is to library as painting is to ___.",
    "Explain how the human heart is like a pump.",
    "Give an analogy that explains how the internet sends information.",
    "Use an everyday analogy to explain what computer memory (RAM) does.",
    "Explain how a cell's nucleus is like a control centre.",
    "Describe electricity flowing in a wire using an analogy with water.",
    "Give a simple analogy for how a vaccine trains the immune system.",
    "Explain how a library catalogue is like a search engine.",
    "Use an analogy to explain why saving money early helps it grow.",
    "How is a seed like a packed lunch for a baby plant? Explain briefly.",
    "Explain a computer virus using an analogy from everyday life.",
    "Give an analogy to explain what a firewall does.",
    "Explain how a school timetable is like a computer program.",
    "Complete the analogy: author is to book as composer is to ___.",
    "Complete the analogy: wheel is to car as wing is to ___.",
]

# ---------------------------------------------------------------------------------------------
# translation (simple words and phrases into French or Spanish)
# ---------------------------------------------------------------------------------------------
_TRANSLATION_WORDS = [
    "hello",
    "thank you",
    "water",
    "bread",
    "house",
    "cat",
    "dog",
    "book",
    "friend",
    "good morning",
    "goodbye",
    "apple",
    "school",
    "red",
    "sun",
    "please",
    "tomorrow",
    "tree",
    "milk",
    "cheese",
    "family",
    "window",
    "chair",
]
_TRANSLATION_PHRASES = [
    "How are you?",
    "Where is the train station?",
    "I am hungry.",
    "What time is it?",
    "My name is Anna.",
    "I like music.",
    "See you tomorrow.",
]
_TRANSLATION_WORD_TEMPLATES = [
    'Translate "{w}" into {lang}.',
    'How do you say "{w}" in {lang}?',
    'What is the {lang} word for "{w}"?',
]
_TRANSLATION_PHRASE_TEMPLATES = [
    'Translate this sentence into {lang}: "{w}"',
    'How would you say "{w}" in {lang}?',
]
_TRANSLATION_REVERSE = [
    'What does the French word "merci" mean in English?',
    'What does the Spanish word "gracias" mean in English?',
    'Translate the Spanish word "biblioteca" into English.',
    'What does the French phrase "bon appétit" mean?',
    'What is the English meaning of the Spanish word "playa"?',
    'Translate the French word "fromage" into English.',
]

# ---------------------------------------------------------------------------------------------
# grammar
# ---------------------------------------------------------------------------------------------
GRAMMAR = [
    'What is the plural of "mouse"?',
    'What is the past tense of "go"?',
    'When should I use "affect" and when should I use "effect"?',
    'Which is correct: "fewer people" or "less people"? Explain briefly.',
    'What is the difference between "its" and "it\'s"?',
    'Identify the verb in this sentence: "The cat sleeps on the sofa."',
    'Fill in the blank with "their", "there" or "they\'re": "___ going to the park later."',
    "What is an adjective? Give two examples.",
    'What is the comparative form of "good"?',
    'Choose the correct word, "than" or "then": "She is taller ___ her brother."',
    'What is the opposite of "generous"?',
    'Give three synonyms for "happy".',
    'What is the past participle of "write"?',
    'Should you write "a hour" or "an hour"? Why?',
    'Find the adverb in this sentence: "He quickly opened the door."',
    "What is the Oxford comma? Give an example.",
    'What is the subject of this sentence: "The tall man opened the gate."',
    'What is the superlative form of "bad"?',
    'Choose "who" or "whom": "To ___ should I send the letter?"',
    "What is a conjunction? Give three examples.",
    'Is this a complete sentence? "Because it was raining." Explain.',
    'What is the plural of "child"?',
    'What is the difference between "borrow" and "lend"?',
    'Which tense is used in this sentence: "I have lived here for five years."',
    "Put these words in the right order to make a sentence: park, to, went, the, we.",
    'How many syllables are in the word "banana"?',
    "What is a prefix? Give an example of a word with a prefix.",
    'When do you use "good" and when do you use "well"?',
    'Is "information" countable or uncountable in English?',
    "What is a pronoun? Give three examples.",
]

# ---------------------------------------------------------------------------------------------
# geography trivia
# ---------------------------------------------------------------------------------------------
GEOGRAPHY = [
    "What is the capital of Canada?",
    "Which ocean lies between Africa and Australia?",
    "On which continent is Egypt?",
    "Which country has the largest population in South America?",
    "What is the highest mountain in the world?",
    "In which country is the city of Venice, famous for its canals?",
    "What is the capital of Australia?",
    "What is the largest ocean on Earth?",
    "Which two countries share the longest international border in the world?",
    "In which country are the ruins of Machu Picchu?",
    "What is the capital of Kenya?",
    "Which river flows through Cairo?",
    "Which is the coldest continent?",
    "What is the smallest country in the world by area?",
    "Athens is the capital of which country?",
    "Which mountain range is often taken as the border between Europe and Asia in Russia?",
    "What is the official language of Brazil?",
    "Which sea lies between southern Europe and northern Africa?",
    "Name three countries that share a border with Germany.",
    "Which city is the largest in Turkey?",
    "What is the capital of Argentina?",
    "On which continent is the Sahara Desert?",
    "Which is the largest country in the world by area?",
    "Name two countries that the Equator passes through.",
    "What is the capital of South Korea?",
    "Which US state is made up of islands in the Pacific Ocean?",
    "Which ocean lies off the west coast of the United States?",
    "Which Scandinavian country is famous for its fjords?",
    "What is the capital of Spain?",
    "Which continent has the most countries?",
    "What is the name of the huge coral reef off the north-east coast of Australia?",
    "Which country has a red maple leaf on its flag?",
    "Which country is shaped like a boot?",
    "What is the capital of Thailand?",
]

# ---------------------------------------------------------------------------------------------
# arithmetic (generated word problems with small numbers and whole-number answers)
# ---------------------------------------------------------------------------------------------
N_ARITHMETIC = 140
ARITH_MAX_SIMILARITY = 0.6  # 3-gram Jaccard ceiling between any two generated problems

_NAMES = [
    ("Anna", "she"),
    ("Ben", "he"),
    ("Chloe", "she"),
    ("David", "he"),
    ("Emma", "she"),
    ("Farid", "he"),
    ("Grace", "she"),
    ("Hugo", "he"),
    ("Isla", "she"),
    ("Jonas", "he"),
    ("Keiko", "she"),
    ("Liam", "he"),
    ("Mei", "she"),
    ("Noah", "he"),
    ("Olga", "she"),
    ("Pablo", "he"),
    ("Rosa", "she"),
    ("Sami", "he"),
    ("Tara", "she"),
    ("Victor", "he"),
]
_ITEMS = [  # (plural, singular, price range in dollars)
    ("apples", "apple", (1, 3)),
    ("notebooks", "notebook", (2, 6)),
    ("pens", "pen", (1, 4)),
    ("sandwiches", "sandwich", (3, 7)),
    ("cinema tickets", "cinema ticket", (6, 12)),
    ("candles", "candle", (2, 8)),
    ("T-shirts", "T-shirt", (8, 15)),
    ("mugs", "mug", (4, 9)),
    ("bus tickets", "bus ticket", (2, 5)),
    ("plants", "plant", (5, 12)),
]
_SHAREABLES = ["sweets", "marbles", "stickers", "biscuits", "cards", "strawberries", "coins"]
_VEHICLES = {  # realistic average speeds in km/h
    "A train": [60, 80, 90, 100, 120],
    "A car": [40, 50, 60, 70, 80, 90],
    "A bus": [30, 40, 45, 50, 60],
    "A cyclist": [10, 12, 15, 18, 20],
    "A boat": [15, 20, 25, 30],
    "A lorry": [50, 60, 70, 80],
}
_SUFFIXES = ["", "", "", " Show your working.", " Explain your answer in one sentence."]


def _arith_shopping_total(r: random.Random) -> str:
    name, pron = r.choice(_NAMES)
    plural, _, (lo, hi) = r.choice(_ITEMS)
    n, p = r.randint(2, 9), r.randint(lo, hi)
    return f"{name} buys {n} {plural} that cost ${p} each. How much does {pron} spend in total?"


def _arith_shopping_change(r: random.Random) -> str:
    name, pron = r.choice(_NAMES)
    plural, _, (lo, hi) = r.choice(_ITEMS)
    n, p = r.randint(2, 4), r.randint(lo, hi)
    note = next(v for v in (10, 20, 50, 100) if v > n * p)
    return f"{name} buys {n} {plural} at ${p} each and pays with a ${note} note. How much change does {pron} get?"


def _arith_shopping_mix(r: random.Random) -> str:
    (pa, _, ra), (pb, _, rb) = r.sample(_ITEMS, 2)
    a, b = r.randint(*ra), r.randint(*rb)
    x, y = r.randint(2, 6), r.randint(1, 5)
    return f"{pa.capitalize()} cost ${a} each and {pb} cost ${b} each. What is the total cost of {x} {pa} and {y} {pb}?"


def _arith_travel_time(r: random.Random) -> str:
    v = r.choice(sorted(_VEHICLES))
    speed = r.choice(_VEHICLES[v])
    hours = r.randint(2, 6)
    return f"{v} travels at {speed} km per hour. How many hours does it take to travel {speed * hours} km?"


def _arith_travel_distance(r: random.Random) -> str:
    hours = r.randint(2, 5)
    if r.random() < 0.5:
        v = r.choice(sorted(_VEHICLES))
        speed = r.choice(_VEHICLES[v])
        return f"{v} moves at a steady {speed} km per hour for {hours} hours. How far does it go?"
    (name, _), town = r.choice(_NAMES), r.choice(["the coast", "the next town", "the lake", "a campsite"])
    speed = r.choice(_VEHICLES["A car"])
    return f"{name} drives to {town} at an average speed of {speed} km/h, and the trip takes {hours} hours. How long is the trip in kilometres?"


def _arith_arrival(r: random.Random) -> str:
    kind = r.choice(["bus", "train", "ferry", "flight"])
    h, m = r.randint(6, 18), r.choice([0, 10, 15, 20, 30, 45])
    d = r.choice([25, 35, 40, 50, 75, 90, 105, 120, 150])
    return f"A {kind} leaves at {h}:{m:02d} and the journey takes {d} minutes. At what time does it arrive?"


def _arith_share(r: random.Random) -> str:
    name, pron = r.choice(_NAMES)
    thing = r.choice(_SHAREABLES)
    k, q = r.randint(2, 6), r.randint(3, 9)
    if r.random() < 0.5:
        return f"{name} has {k * q} {thing} and shares them equally among {k} friends. How many does each friend get?"
    return f"{k * q} {thing} are packed into bags of {q}. How many bags are filled?"


def _arith_share_left(r: random.Random) -> str:
    thing = r.choice(_SHAREABLES)
    k, q, rem = r.randint(3, 6), r.randint(2, 7), 0
    while rem == 0:
        rem = r.randint(1, k - 1)
    return (
        f"A teacher has {k * q + rem} {thing} to hand out equally to {k} children. "
        f"How many does each child get, and how many are left over?"
    )


def _arith_bill(r: random.Random) -> str:
    k, each = r.randint(2, 6), r.randint(8, 25)
    return f"{k} friends share a restaurant bill of ${k * each} equally. How much does each person pay?"


def _arith_age_future(r: random.Random) -> str:
    (name, pron), sib = r.choice(_NAMES), r.choice(["brother", "sister", "cousin"])
    a, d, f = r.randint(5, 15), r.randint(2, 9), r.randint(2, 10)
    poss = "her" if pron == "she" else "his"
    return f"{name} is {a} years old. {poss.capitalize()} {sib} is {d} years older. How old will the {sib} be in {f} years?"


def _arith_age_sum(r: random.Random) -> str:
    (n1, _), (n2, _) = r.sample(_NAMES, 2)
    a, b, f = r.randint(4, 14), r.randint(20, 45), r.randint(2, 6)
    return f"{n1} is {a} and {n2} is {b}. What will the sum of their ages be in {f} years?"


def _arith_age_past(r: random.Random) -> str:
    name, _ = r.choice(_NAMES)
    a, f = r.randint(12, 40), r.randint(3, 10)
    return f"{name} is {a} years old now. How old was {name} {f} years ago?"


def _arith_recipe_scale(r: random.Random) -> str:
    dish, ing, unit = r.choice(
        [
            ("pancake batter", "flour", "grams"),
            ("rice pudding", "rice", "grams"),
            ("hot chocolate", "milk", "millilitres"),
            ("shortbread", "butter", "grams"),
            ("fruit crumble", "sugar", "grams"),
            ("vegetable soup", "stock", "millilitres"),
        ]
    )
    base = r.choice([2, 4])
    per = r.choice([25, 50, 75, 100])
    target = base * r.choice([2, 3]) if r.random() < 0.6 else base // 2
    who = "person" if target == 1 else "people"
    if r.random() < 0.5:
        return (
            f"A recipe for {base} people uses {per * base} {unit} of {ing}. "
            f"How much {ing} is needed for {target} {who}?"
        )
    return (
        f"A batch of {dish} that serves {base} needs {per * base} {unit} of {ing}. "
        f"If you cook it for {target} {who} instead, how much {ing} do you need?"
    )


def _arith_recipe_count(r: random.Random) -> str:
    item, one, many = r.choice(
        [
            ("eggs", "cake", "cakes"),
            ("bananas", "loaf of banana bread", "loaves of banana bread"),
            ("lemons", "jug of lemonade", "jugs of lemonade"),
            ("tomatoes", "pot of soup", "pots of soup"),
            ("apples", "apple pie", "apple pies"),
            ("potatoes", "tray of roast potatoes", "trays of roast potatoes"),
        ]
    )
    per, n = r.randint(2, 5), r.randint(3, 8)
    if r.random() < 0.5:
        return f"One {one} needs {per} {item}. How many {item} are needed to make {n} {many}?"
    name, pron = r.choice(_NAMES)
    return f"{name} is making {n} {many} for a party, and each one uses {per} {item}. How many {item} does {pron} need?"


def _arith_savings(r: random.Random) -> str:
    name, pron = r.choice(_NAMES)
    w, weeks = r.choice([3, 4, 5, 6, 8, 10, 12, 15]), r.randint(4, 12)
    goal = r.choice(["a bike", "a video game", "a pair of trainers", "a guitar", "a tent"])
    return f"{name} saves ${w} every week. How many weeks will it take {name} to save ${w * weeks} for {goal}?"


def _arith_area(r: random.Random) -> str:
    place = r.choice(["garden", "room", "playground", "carpet", "field", "kitchen floor"])
    length, w = r.randint(3, 12), r.randint(2, 9)
    ask = r.choice(["area", "perimeter"])
    return f"A rectangular {place} is {length} metres long and {w} metres wide. What is its {ask}?"


def _arith_discount(r: random.Random) -> str:
    item = r.choice(["jacket", "lamp", "backpack", "pair of boots", "board game", "kettle"])
    pct = r.choice([10, 20, 25, 50])
    price = r.choice([20, 40, 60, 80, 100, 120]) if pct != 25 else r.choice([20, 40, 60, 80])
    return f"A {item} costs ${price}. In a sale it is {pct}% off. What is the sale price?"


def _arith_pages(r: random.Random) -> str:
    name, pron = r.choice(_NAMES)
    per, days = r.choice([5, 8, 10, 12, 15, 20, 25]), r.randint(4, 12)
    obj = "her" if pron == "she" else "him"
    if r.random() < 0.5:
        return f"A book has {per * days} pages. If {name} reads {per} pages a day, how many days will it take {obj} to finish?"
    return f"{name} reads {per} pages every evening and finishes a novel in exactly {days} days. How many pages does the novel have?"


def _arith_temperature(r: random.Random) -> str:
    t0, d = r.randint(-5, 12), r.randint(3, 14)
    place = r.choice(["Oslo", "a mountain village", "the desert camp", "Toronto", "the school yard"])
    if r.random() < 0.5:
        up = r.random() < 0.6
        return (
            f"In {place} the temperature was {t0} degrees Celsius in the morning. By the afternoon "
            f"it was {d} degrees {'warmer' if up else 'colder'}. What was the afternoon temperature?"
        )
    t1 = t0 + d
    return (
        f"At midnight in {place} it was {t0} degrees Celsius, and at noon it was {t1} degrees. "
        f"By how many degrees did the temperature rise?"
    )


def _arith_tiles(r: random.Random) -> str:
    rows, per = r.randint(3, 9), r.randint(4, 12)
    thing = r.choice(["chairs", "apple trees", "seats", "tiles", "parking spaces"])
    return f"There are {rows} rows of {thing} with {per} in each row. How many {thing} are there altogether?"


def _arith_minutes(r: random.Random) -> str:
    name, pron = r.choice(_NAMES)
    act = r.choice(["practises the piano", "walks the dog", "reads", "goes jogging", "studies maths"])
    m, d = r.choice([15, 20, 25, 30, 40, 45]), r.choice([4, 5, 6, 7])
    return f"{name} {act} for {m} minutes a day, {d} days a week. How many minutes is that per week?"


_ARITH_GENERATORS = [
    _arith_shopping_total,
    _arith_shopping_change,
    _arith_shopping_mix,
    _arith_travel_time,
    _arith_travel_distance,
    _arith_arrival,
    _arith_share,
    _arith_share_left,
    _arith_bill,
    _arith_age_future,
    _arith_age_sum,
    _arith_age_past,
    _arith_recipe_scale,
    _arith_recipe_count,
    _arith_savings,
    _arith_area,
    _arith_discount,
    _arith_pages,
    _arith_temperature,
    _arith_tiles,
    _arith_minutes,
]


def make_arithmetic(r: random.Random, n: int = N_ARITHMETIC) -> list[str]:
    """``n`` distinct word problems, cycling through the templates so each is used evenly."""
    out: list[str] = []
    shingles: list[set] = []
    i = 0
    while len(out) < n:
        gen = _ARITH_GENERATORS[i % len(_ARITH_GENERATORS)]
        i += 1
        for _ in range(200):  # redraw until it is not a near-copy of one already kept
            text = gen(r) + r.choice(_SUFFIXES)
            sh = _shingles(text)
            if all(len(sh & o) / len(sh | o) < ARITH_MAX_SIMILARITY for o in shingles):
                out.append(text)
                shingles.append(sh)
                break
    return out


# ---------------------------------------------------------------------------------------------
# assembly
# ---------------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """Lower-case, keep only letters/digits, collapse whitespace: the key for duplicate checks."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _templated(r: random.Random, items, templates, fmt) -> list[str]:
    """Fill each item into a template, drawn so consecutive items never share one."""
    out, last = [], None
    for item in items:
        t = r.choice([t for t in templates if t != last])
        last = t
        out.append(fmt(t, item))
    return out


def build() -> list[dict]:
    r = random.Random(SEED)
    classification = (
        [r.choice(_SENTIMENT_TEMPLATES).format(t=t) for t in _SENTIMENT]
        + [r.choice(_HEADLINE_TEMPLATES).format(t=t) for t in _HEADLINES]
        + [r.choice(_EMAIL_TEMPLATES).format(t=t) for t in _EMAILS]
        + _CLASSIFICATION_MISC
    )
    summarise = _templated(r, _PARAGRAPHS, _SUMMARY_TEMPLATES, lambda t, p: t.format(t=p))
    comparison = _templated(r, _COMPARISON_PAIRS, _COMPARISON_TEMPLATES, lambda t, ab: t.format(a=ab[0], b=ab[1]))
    definition = (
        _templated(r, _DEFINITION_TERMS, _DEFINITION_TEMPLATES, lambda t, x: t.format(x=x)) + _DEFINITION_IDIOMS
    )
    translation = []
    for i, w in enumerate(_TRANSLATION_WORDS):
        lang = ("French", "Spanish")[i % 2]
        translation.append(r.choice(_TRANSLATION_WORD_TEMPLATES).format(w=w, lang=lang))
    for i, w in enumerate(_TRANSLATION_PHRASES):
        lang = ("Spanish", "French")[i % 2]
        translation.append(r.choice(_TRANSLATION_PHRASE_TEMPLATES).format(w=w, lang=lang))
    translation += _TRANSLATION_REVERSE

    categories = {
        "explanation": EXPLANATION,
        "list": LIST,
        "rewriting": REWRITING,
        "creative": CREATIVE,
        "classification": classification,
        "extraction": EXTRACTION,
        "arithmetic": make_arithmetic(r),
        "code": CODE,
        "advice": ADVICE,
        "summarise": summarise,
        "comparison": comparison,
        "definition": definition,
        "how_to": HOW_TO,
        "analogy": ANALOGY,
        "translation": translation,
        "grammar": GRAMMAR,
        "geography": GEOGRAPHY,
    }
    records = [
        {"id": f"{cat}-{i}", "category": cat, "prompt": prompt}
        for cat, prompts in categories.items()
        for i, prompt in enumerate(prompts, start=1)
    ]
    r.shuffle(records)
    return records


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def _shingles(text: str, k: int = 3) -> set[tuple[str, ...]]:
    words = normalise(text).split()
    return {tuple(words[i : i + k]) for i in range(max(1, len(words) - k + 1))}


def check(path: Path, near: float = 0.7) -> int:
    """Print counts and checks for the written file; return the number of problems found."""
    problems = 0
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            print(f"line {n}: invalid JSON ({e})")
            problems += 1
            continue
        if set(rec) != {"id", "category", "prompt"} or not rec["id"].startswith(rec["category"] + "-"):
            print(f"line {n}: bad record {rec}")
            problems += 1
        if not rec["prompt"].isascii():
            # only the French/Spanish words inside quotes may be non-ASCII
            print(f"note: non-ASCII prompt {rec['id']}: {rec['prompt']!r}")
        records.append(rec)

    counts = Counter(rec["category"] for rec in records)
    total = len(records)
    print(f"total: {total}")
    for cat, c in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:<15}{c:>5}  ({100 * c / total:.1f}%)")
    small = [c for c, k in counts.items() if k < 40 and c not in ("analogy", "translation", "grammar", "geography")]
    if total < 700 or small or counts["arithmetic"] > 0.2 * total:
        print(f"size problem: total={total} small={small} arithmetic={counts['arithmetic']}")
        problems += 1

    ids = Counter(rec["id"] for rec in records)
    dup_ids = [i for i, c in ids.items() if c > 1]
    keys = Counter(normalise(rec["prompt"]) for rec in records)
    dup_text = [k for k, c in keys.items() if c > 1]
    print(f"duplicate ids: {len(dup_ids)}  exact duplicates after normalisation: {len(dup_text)}")
    problems += len(dup_ids) + len(dup_text)

    # near-duplicates: Jaccard similarity of word 3-gram shingles
    sh = [(rec["id"], _shingles(rec["prompt"])) for rec in records]
    near_pairs = []
    for i in range(len(sh)):
        for j in range(i + 1, len(sh)):
            a, b = sh[i][1], sh[j][1]
            inter = len(a & b)
            if inter and inter / len(a | b) >= near:
                near_pairs.append((inter / len(a | b), sh[i][0], sh[j][0]))
    print(f"near-duplicate pairs (3-gram Jaccard >= {near}): {len(near_pairs)}")
    for s, a, b in sorted(near_pairs, reverse=True)[:20]:
        print(f"  {s:.2f} {a} {b}")
    problems += len(near_pairs)

    words = sorted(len(rec["prompt"].split()) for rec in records)
    q = lambda p: words[min(len(words) - 1, int(p * len(words)))]  # noqa: E731
    print(
        f"prompt length in words: min {words[0]}, p10 {q(0.1)}, median {q(0.5)}, "
        f"p90 {q(0.9)}, max {words[-1]}, mean {sum(words) / len(words):.1f}"
    )
    bins = [(1, 5), (6, 10), (11, 15), (16, 25), (26, 40), (41, 60), (61, 100)]
    for lo, hi in bins:
        k = sum(lo <= w <= hi for w in words)
        print(f"  {lo:>3}-{hi:<3} words: {k:>4} {'#' * (k // 8)}")
    per_cat = {}
    for rec in records:
        per_cat.setdefault(rec["category"], []).append(len(rec["prompt"].split()))
    print("mean words per category: " + ", ".join(f"{c} {sum(v) / len(v):.0f}" for c, v in sorted(per_cat.items())))
    print("OK" if problems == 0 else f"{problems} problem(s)")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="after writing, print counts and checks")
    ap.add_argument("--stdout", action="store_true", help="print the JSONL instead of writing it")
    ap.add_argument("--out", type=Path, default=OUT, help=f"output path (default {OUT})")
    args = ap.parse_args(argv)
    text = to_jsonl(build())
    if args.stdout:
        sys.stdout.write(text)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} prompts to {args.out}")
    return check(args.out) if args.check else 0


if __name__ == "__main__":
    sys.exit(main())
